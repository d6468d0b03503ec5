"""RAER's five classes and their class texts (the built-in label set, caer_jax.label_sets)."""

# Label ids 0..4, in the order of the RAER annotation files (which store them 1-based).
CLASS_NAMES = ("Neutrality", "Enjoyment", "Confusion", "Fatigue", "Distraction")

_CLASS_DESCRIPTORS = (
    "Relaxed mouth,open eyes,neutral eyebrows,no noticeable emotional changes,engaged with study "
    "materials, or natural body posture.",
    "Upturned mouth corners,sparkling eyes,relaxed eyebrows,focused on course content,or "
    "occasionally nodding in agreement.",
    "Furrowed eyebrows, slightly open mouth, wandering or puzzled gaze, chin rests on the palm,or "
    "eyes lock on learning material.",
    "Mouth opens in a yawn, eyelids droop, head tilts forward, eyes lock on learning material, or "
    "hand writing.",
    "Shifting eyes, restless or fidgety posture, relaxed but unfocused expression,frequently "
    "checking phone,or averted gaze from study materials.",
)

_FACE_DESCRIPTORS = (
    "Relaxed mouth,open eyes,neutral eyebrows,smooth forehead,natural head position.",
    "Upturned mouth,sparkling or slightly squinted eyes,raised eyebrows,relaxed forehead.",
    "Furrowed eyebrows, slightly open mouth, squinting or narrowed eyes, tensed forehead.",
    "Mouth opens in a yawn, eyelids droop, head tilts forward.",
    "Averted gaze or looking away, restless or fidgety posture, shoulders shift restlessly.",
)

_CLASS_SENTENCES = (
    "Neutrality in learning state.",
    "Enjoyment in learning state.",
    "Confusion in learning state.",
    "Fatigue in learning state.",
    "Distraction.",
)

TEXT_TYPES = {
    "class_descriptor": _CLASS_DESCRIPTORS,
    "face_descriptor": _FACE_DESCRIPTORS,
    "class_names": _CLASS_SENTENCES,
    "class_names_with_context": tuple("an expression of " + s for s in _CLASS_SENTENCES),
}
