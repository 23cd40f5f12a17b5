"""Class tables: the tissue classes of a dataset or model, their colours and text descriptions.

A class table belongs to a dataset and travels with a trained model (in its JSON config); code
paths never hard-code class names. This module is plain data (no torch), so datasets, workers and
exporters can import it cheaply.

Background is not a class of the table: it is the value ``len(table)`` in masks (BCSS-WSSS masks
use 4 for background/exclude with 4 tissue classes, LUAD-HistoSeg 4, WSSS4LUAD 3), with its own
name and colour.

Descriptions are the phrases that the DualProtoSeg prompt learner puts after its learnable
context, one text prototype per description. The BCSS ones are the reference code's ten per class;
those of LUAD-HistoSeg and WSSS4LUAD are ours (histology vocabulary for the same tissue types),
chosen to follow the same pattern of ten short morphological phrases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wsiproto.errors import WsiprotoError

RGB = tuple[int, int, int]


def _rgb(value: Any, what: str) -> RGB:
    try:
        r, g, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise WsiprotoError(f"{what}: colour must be three integers [r, g, b], got {value!r}") from None
    if not all(0 <= v <= 255 for v in (r, g, b)):
        raise WsiprotoError(f"{what}: colour components must lie in 0..255, got {value!r}")
    return (r, g, b)


@dataclass(frozen=True)
class ClassInfo:
    """One tissue class: short name (as in label files), display colour and text descriptions."""

    name: str
    colour: RGB
    descriptions: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise WsiprotoError(f"class name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "colour", _rgb(self.colour, f"class {self.name}"))
        descriptions = tuple(str(d).strip() for d in self.descriptions)
        if any(not d for d in descriptions):
            raise WsiprotoError(f"class {self.name}: descriptions must be non-empty strings")
        object.__setattr__(self, "descriptions", descriptions)

    def to_dict(self) -> dict:
        return {"name": self.name, "colour": list(self.colour), "descriptions": list(self.descriptions)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassInfo:
        if not isinstance(data, Mapping) or "name" not in data or "colour" not in data:
            raise WsiprotoError(f"a class entry needs 'name' and 'colour', got {data!r}")
        return cls(str(data["name"]), data["colour"], tuple(data.get("descriptions", ())))


@dataclass(frozen=True)
class ClassTable:
    """An ordered set of tissue classes plus the background's name and colour.

    Class ``i`` is value ``i`` in masks and column ``i`` of label vectors; background is
    ``num_classes``.
    """

    name: str
    classes: tuple[ClassInfo, ...]
    background_name: str = "background"
    background_colour: RGB = (255, 255, 255)
    aliases: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        classes = tuple(self.classes)
        if not classes:
            raise WsiprotoError(f"class table {self.name!r} has no classes")
        names = [c.name for c in classes]
        if len(set(names)) != len(names):
            raise WsiprotoError(f"class table {self.name!r}: duplicate class names {names}")
        if self.background_name in names:
            raise WsiprotoError(
                f"class table {self.name!r}: background name {self.background_name!r} is also a class")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "background_colour",
                           _rgb(self.background_colour, f"table {self.name} background"))

    # --- views -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        return iter(self.classes)

    def __getitem__(self, index: int) -> ClassInfo:
        return self.classes[index]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def colours(self) -> list[RGB]:
        return [c.colour for c in self.classes]

    @property
    def background_index(self) -> int:
        """The mask value of background: one past the last class."""
        return len(self.classes)

    def palette(self) -> list[RGB]:
        """Colours indexed by mask value: the classes, then background."""
        return self.colours + [self.background_colour]

    def index(self, name: str) -> int:
        """Mask value of a class (case-insensitive); the background name gives ``background_index``."""
        key = name.strip().lower()
        for i, c in enumerate(self.classes):
            if c.name.lower() == key:
                return i
        if key == self.background_name.lower():
            return self.background_index
        raise WsiprotoError(f"class table {self.name!r} has no class {name!r}; classes: {self.names}")

    def descriptions(self, per_class: int | None = None) -> list[list[str]]:
        """The first ``per_class`` descriptions of each class (all when None).

        A class without descriptions falls back to its name, so any table can drive the prompt
        learner. Asking for more than a class has is an error, not a silent repeat.
        """
        out = []
        for c in self.classes:
            texts = list(c.descriptions) or [c.name]
            if per_class is not None:
                if per_class < 1:
                    raise WsiprotoError(f"descriptions per class must be >= 1, got {per_class}")
                if per_class > len(texts):
                    raise WsiprotoError(
                        f"class {c.name} of table {self.name!r} has {len(texts)} descriptions, "
                        f"{per_class} requested", hint="lower the number of descriptions per class")
                texts = texts[:per_class]
            out.append(texts)
        return out

    # --- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "classes": [c.to_dict() for c in self.classes],
            "background": {"name": self.background_name, "colour": list(self.background_colour)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassTable:
        if not isinstance(data, Mapping) or not isinstance(data.get("classes"), list):
            raise WsiprotoError("a class table needs a 'classes' list")
        background = data.get("background") or {}
        return cls(
            name=str(data.get("name", "custom")),
            classes=tuple(ClassInfo.from_dict(c) for c in data["classes"]),
            background_name=str(background.get("name", "background")),
            background_colour=background.get("colour", (255, 255, 255)),
        )

    @classmethod
    def from_names(cls, names: Sequence[str], name: str = "custom") -> ClassTable:
        """A table from bare class names, with distinct default colours and no descriptions."""
        palette = _DEFAULT_COLOURS
        return cls(name, tuple(ClassInfo(n, palette[i % len(palette)]) for i, n in enumerate(names)))


# Distinct, colour-blind-friendly-ish defaults for tables made from bare names (Okabe-Ito).
_DEFAULT_COLOURS: list[RGB] = [
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
    (0, 114, 178), (213, 94, 0), (204, 121, 167), (0, 0, 0),
]


BCSS = ClassTable(
    name="bcss",
    aliases=("bcss-wsss",),
    classes=(
        ClassInfo("TUM", (255, 0, 0), (
            "invasive carcinoma", "malignant epithelium", "pleomorphic nuclei", "solid tumor nests",
            "irregular glands", "high nuclear grade", "mitotic figures", "desmoplastic reaction",
            "angiogenesis", "tumor budding")),
        ClassInfo("STR", (0, 255, 0), (
            "fibrous stroma", "collagen bundles", "spindle cells", "hyalinized stroma", "desmoplasia",
            "pink collagen", "fibroblasts", "loose connective tissue", "myxoid stroma",
            "scirrhous reaction")),
        ClassInfo("LYM", (0, 0, 255), (
            "lymphocytic infiltrate", "TILs", "plasma cells", "lymphoid aggregates",
            "peritumoral inflammation", "immune hotspot", "macrophages", "granulocytes",
            "tertiary lymphoid structure", "chronic inflammation")),
        ClassInfo("NEC", (153, 0, 255), (
            "tumor necrosis", "necrotic debris", "ghost cells", "comedo necrosis", "karyorrhexis",
            "pink acellular areas", "central necrosis", "apoptotic bodies", "nuclear dust",
            "geographic necrosis")),
    ),
)

# LUAD-HistoSeg palette as distributed with the dataset's masks (TE red, NEC green, LYM blue,
# TAS orange); descriptions are ours.
LUAD_HISTOSEG = ClassTable(
    name="luad-histoseg",
    aliases=("luad",),
    classes=(
        ClassInfo("TE", (205, 51, 51), (
            "tumor epithelium", "lung adenocarcinoma", "atypical glandular cells", "acinar tumor glands",
            "papillary tumor structures", "pleomorphic nuclei", "solid tumor nests",
            "lepidic tumor growth", "crowded epithelial cells", "high nuclear grade")),
        ClassInfo("NEC", (0, 255, 0), (
            "tumor necrosis", "necrotic debris", "ghost cells", "karyorrhexis", "pink acellular areas",
            "nuclear dust", "eosinophilic necrotic tissue", "coagulative necrosis",
            "apoptotic bodies", "geographic necrosis")),
        ClassInfo("LYM", (65, 105, 225), (
            "lymphocytic infiltrate", "tumor infiltrating lymphocytes", "lymphoid aggregates",
            "plasma cells", "dense small round blue cells", "peritumoral inflammation",
            "tertiary lymphoid structure", "chronic inflammation", "immune hotspot", "macrophages")),
        ClassInfo("TAS", (255, 165, 0), (
            "tumor associated stroma", "fibrous stroma", "collagen bundles", "spindle cells",
            "desmoplastic stroma", "fibroblasts", "pink collagen", "hyalinized stroma",
            "myxoid stroma", "loose connective tissue")),
    ),
)

# WSSS4LUAD palette as stored in the challenge's palette masks (index 0..2, 3 background white).
WSSS4LUAD = ClassTable(
    name="wsss4luad",
    classes=(
        ClassInfo("tumor", (0, 64, 128), (
            "tumor epithelium", "lung adenocarcinoma", "atypical glandular cells", "solid tumor nests",
            "acinar tumor glands", "papillary tumor structures", "pleomorphic nuclei",
            "mitotic figures", "crowded epithelial cells", "high nuclear grade")),
        ClassInfo("stroma", (64, 128, 0), (
            "tumor associated stroma", "fibrous stroma", "collagen bundles", "spindle cells",
            "desmoplastic stroma", "fibroblasts", "pink collagen", "hyalinized stroma",
            "inflammatory stroma", "loose connective tissue")),
        ClassInfo("normal", (243, 152, 0), (
            "normal lung tissue", "alveolar walls", "pneumocytes", "alveolar spaces",
            "bronchial epithelium", "ciliated columnar cells", "normal blood vessels",
            "thin alveolar septa", "alveolar macrophages", "benign lung parenchyma")),
    ),
)

_REGISTRY: dict[str, ClassTable] = {}


def register_class_table(table: ClassTable, *, overwrite: bool = False) -> ClassTable:
    """Make ``table`` available to :func:`get_class_table` under its name and aliases."""
    for key in (table.name, *table.aliases):
        key = key.lower()
        if key in _REGISTRY and not overwrite and _REGISTRY[key] is not table:
            raise WsiprotoError(f"a class table named {key!r} is already registered")
        _REGISTRY[key] = table
    return table


for _table in (BCSS, LUAD_HISTOSEG, WSSS4LUAD):
    register_class_table(_table)


def list_class_tables() -> list[str]:
    """Registered table names (aliases excluded)."""
    return sorted({t.name for t in _REGISTRY.values()})


def get_class_table(name: str | ClassTable | Mapping[str, Any] | Iterable[str]) -> ClassTable:
    """Resolve a table from a registered name, a table, its dict form or a list of class names."""
    if isinstance(name, ClassTable):
        return name
    if isinstance(name, Mapping):
        return ClassTable.from_dict(name)
    if isinstance(name, str):
        try:
            return _REGISTRY[name.strip().lower()]
        except KeyError:
            raise WsiprotoError(f"unknown class table {name!r}",
                                hint=f"choose one of {', '.join(list_class_tables())}") from None
    names = [str(n) for n in name]
    return ClassTable.from_names(names)
