"""Layer groups: a backbone cut into ordered slices (input -> output) for staged unfreezing.

A spec's ``layer_groups`` are regular expressions. For a Keras backbone they match
layer names; for a SavedModel backbone (one opaque layer) they match variable paths.
A member belongs to the first group whose pattern ``re.search``es it. With
``group_boundaries`` (layer names that end each group but the last), groups
are cut by position instead, for models whose layer names are auto-numbered.
With neither, the weighted members are split into four groups of similar size by depth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import keras

from tlkit.backbones.spec import BackboneSpec
from tlkit.errors import ConfigError

DEFAULT_GROUP_COUNT = 4


def weighted_leaf_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Layers that own weights, in order, descending into nested models."""
    leaves: list[keras.layers.Layer] = []
    children = getattr(layer, "layers", None)
    if isinstance(layer, keras.Model) and children is not None:
        for child in children:
            leaves.extend(weighted_leaf_layers(child))
    elif layer.weights:
        leaves.append(layer)
    return leaves


@dataclass
class LayerGroups:
    """Resolved groups of one backbone instance.

    ``members[i]`` holds layers (Keras backbones) or variables (SavedModel backbones).
    """

    backbone: keras.layers.Layer
    names: list[str]
    members: list[list[object]] = field(default_factory=list)
    by_variable: bool = False
    # SavedModel variables keep the trainability they were saved with (BatchNorm moving
    # statistics stay non-trainable when their group is thawed).
    saved_trainable: dict[int, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.by_variable and not self.saved_trainable:
            self.saved_trainable = {id(v): bool(v.trainable) for group in self.members for v in group}  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.members)

    def variables(self, index: int) -> list[keras.Variable]:
        """Every variable (trainable or not) in group ``index``."""
        if self.by_variable:
            return list(self.members[index])  # type: ignore[arg-type]
        out: list[keras.Variable] = []
        for layer in self.members[index]:
            out.extend(layer.weights)  # type: ignore[attr-defined]
        return out

    def set_trainable(self, top: int | str, freeze_batchnorm: bool = True) -> list[int]:
        """Freezes the whole backbone, then thaws the ``top`` groups nearest the output.

        Args:
            top: how many groups to thaw from the output end; ``"all"`` thaws every group.
            freeze_batchnorm: keep every BatchNormalization layer frozen, thawed groups
                included, as Keras's transfer-learning guide advises for small datasets.

        Returns:
            Indices of the thawed groups.

        Frozen BatchNorm layers run in inference mode (Keras 3 does so for
        ``trainable=False``), so their moving statistics do not move. (Calling the
        backbone with ``training=False`` inside a functional model is not enough in
        Keras 3: the outer model's ``training`` value overrides it.) The BatchNorm layers of
        a classifier built with ``HeadConfig.bn_inference`` are
        :class:`~tlkit.layers.FrozenBatchNormalization`, in inference mode whatever their
        ``trainable``; ``freeze_batchnorm`` then also keeps their gamma and beta fixed.
        """
        count = len(self.members) if top == "all" else int(top)
        if count < 0 or count > len(self.members):
            raise ConfigError(f"cannot unfreeze {top!r} groups: the backbone has {len(self.members)} groups")
        thawed = list(range(len(self.members) - count, len(self.members)))
        if count == 0:
            self.backbone.trainable = False
            return []
        self.backbone.trainable = True
        for index, group in enumerate(self.members):
            for member in group:
                if self.by_variable:
                    member.trainable = index in thawed and self.saved_trainable[id(member)]  # type: ignore[attr-defined]
                    continue
                frozen_bn = freeze_batchnorm and isinstance(member, keras.layers.BatchNormalization)
                member.trainable = index in thawed and not frozen_bn  # type: ignore[attr-defined]
        return thawed


def resolve_groups(spec: BackboneSpec, backbone: keras.layers.Layer) -> LayerGroups:
    """Assigns every weighted layer (or variable) of ``backbone`` to one of the spec's groups.

    Raises:
        ConfigError: a pattern matches nothing, or some weights belong to no group.
    """
    by_variable = not isinstance(backbone, keras.Model)
    members: list[object] = list(backbone.weights) if by_variable else weighted_leaf_layers(backbone)
    key = (lambda m: m.path) if by_variable else (lambda m: m.name)  # noqa: E731
    patterns = spec.layer_groups
    boundaries = spec.group_boundaries
    if boundaries and not by_variable:
        return _by_boundaries(backbone, members, tuple(boundaries))
    if not patterns:
        return _by_depth(backbone, members, by_variable)
    compiled = [re.compile(p) for p in patterns]
    buckets: list[list[object]] = [[] for _ in compiled]
    orphans = []
    for member in members:
        for index, pattern in enumerate(compiled):
            if pattern.search(key(member)):
                buckets[index].append(member)
                break
        else:
            orphans.append(key(member))
    if orphans:
        raise ConfigError(
            f"backbone {spec.name!r}: {len(orphans)} weighted members match no layer group "
            f"(first: {orphans[:5]}); extend the spec's layer_groups"
        )
    empty = [patterns[i] for i, bucket in enumerate(buckets) if not bucket]
    if empty:
        raise ConfigError(f"backbone {spec.name!r}: layer group pattern(s) {empty} match no weights")
    return LayerGroups(backbone, list(patterns), buckets, by_variable)


def _by_boundaries(backbone: keras.layers.Layer, members: list[object], boundaries: tuple[str, ...]) -> LayerGroups:
    layer_names = [layer.name for layer in backbone.layers]  # type: ignore[attr-defined]
    missing = [b for b in boundaries if b not in layer_names]
    if missing:
        raise ConfigError(f"group boundaries {missing} are not layers of the backbone")
    cut_positions = [layer_names.index(b) for b in boundaries]
    position = {id(layer): i for i, layer in enumerate(backbone.layers)}  # type: ignore[attr-defined]
    buckets: list[list[object]] = [[] for _ in range(len(boundaries) + 1)]
    for member in members:
        pos = position.get(id(member), 0)
        group = sum(pos > cut for cut in cut_positions)
        buckets[group].append(member)
    names = [f"up to {b}" for b in boundaries] + [f"after {boundaries[-1]}"]
    return LayerGroups(backbone, names, buckets, False)


def _by_depth(backbone: keras.layers.Layer, members: list[object], by_variable: bool) -> LayerGroups:
    """Splits the trainable members into equal slices by order; a non-trainable variable
    (e.g. BatchNorm statistics listed after all trainable ones in a SavedModel) joins the
    group of the trainable variable whose name shares the longest prefix with it."""
    if by_variable:
        ranked = [m for m in members if m.trainable] or members  # type: ignore[attr-defined]
    else:
        ranked = members
    count = min(DEFAULT_GROUP_COUNT, len(ranked)) or 1
    buckets: list[list[object]] = [[] for _ in range(count)]
    group_of: dict[int, int] = {}
    for index, member in enumerate(ranked):
        group_of[id(member)] = index * count // max(len(ranked), 1)
        buckets[group_of[id(member)]].append(member)
    for member in members:
        if id(member) not in group_of:
            nearest = max(ranked, key=lambda r: _common_prefix(r.path, member.path))  # type: ignore[attr-defined]
            buckets[group_of[id(nearest)]].append(member)
    names = [f"depth {i + 1}/{count}" for i in range(count)]
    return LayerGroups(backbone, names, buckets, by_variable)


def _common_prefix(a: str, b: str) -> int:
    size = 0
    for x, y in zip(a, b):
        if x != y:
            break
        size += 1
    return size
