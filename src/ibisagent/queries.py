"""What a text query says about the image beyond the object's name."""

from __future__ import annotations

import re

__all__ = ["UNCLICKABLE_OBJECTS", "is_unclickable", "mirror_safe", "query_variants"]

#: objects a click segmenter cannot outline with a few clicks: thin structures (vessel trees, membranes) and masks of
#: every instance of a kind scattered over the image (all nuclei, all mitochondria, all exudates). Training leaves
#: them out; the evaluation reports them as the ``thin`` group. Compact single objects that share a word with these
#: (an ultrasound "blood vessel" cross-section, "largest cell nucleus") are not in the list.
UNCLICKABLE_OBJECTS = frozenset({
    "retinal blood vessels", "retinal vessels", "hepatic vessels", "cell membranes", "all cell nuclei", "cell nuclei",
    "mitochondria", "synapses", "glia and extracellular space", "hard exudates", "soft exudates", "haemorrhages",
    "microaneurysms", "cell nuclei (3d instance label map)",
})

_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirror_safe(query: str) -> bool:
    """Whether a left-right mirrored image still matches ``query`` (False when it names a side: the mirrored
    "left kidney" is the right one)."""
    return _SIDE.search(query) is None


def is_unclickable(object_name: str) -> bool:
    """Whether ``object_name`` is in :data:`UNCLICKABLE_OBJECTS` (case-insensitive)."""
    return object_name.strip().lower() in UNCLICKABLE_OBJECTS


def _modality_phrase(modality: str) -> str:
    m = modality.strip()
    low = m.lower()
    for key, word in (("ct", "CT"), ("mri", "MRI"), ("mr ", "MRI"), ("x-ray", "X-ray"), ("ultrasound", "ultrasound"),
                      ("endoscopy", "endoscopy"), ("colonoscopy", "colonoscopy"), ("dermoscopy", "dermoscopy"),
                      ("fundus", "fundus"), ("oct", "OCT"), ("histopathology", "histology"),
                      ("microscopy", "microscopy")):
        if low.startswith(key) or f" {key}" in f" {low}":
            return word
    return m.split("(")[0].strip() or "medical"


def query_variants(query: str, object_name: str, modality: str = "") -> list[str]:
    """Other wordings of a referring query, for training on varied text: the query itself first, then the object's
    name alone and in short templates with and without the modality. Side words stay as they are (left/right is the
    patient's side, in the object name as in the query), so :func:`mirror_safe` answers the same for every variant."""
    name = object_name.strip()
    out = [query.strip()]
    if name:
        mod = _modality_phrase(modality) if modality else ""
        out += [f"the {name}", name, f"segment the {name}", f"where is the {name}?"]
        if mod:
            out += [f"the {name} in this {mod} image", f"{name}, {mod}", f"find the {name} in the {mod} scan"]
    seen: dict[str, None] = {}
    for q in out:
        if q and mirror_safe(q) == mirror_safe(query):
            seen.setdefault(q, None)
    return list(seen)
