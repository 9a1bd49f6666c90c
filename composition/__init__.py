"""Multi-concept composition: several concept adapters in one image.

`AdapterBank` holds N adapters against one pipeline and swaps them in by tensor; `ConceptPrompt` binds each
adapter to its phrase; `generate(method, pipe, bank, prompt, ...)` runs merge, switch, composite, cmlora or
clora and returns a `Result`. `python -m composition` is the command line.
"""

from composition.bank import AdapterBank
from composition.errors import CompositionError
from composition.methods import METHODS, generate, method_options
from composition.prompt import Concept, ConceptPrompt
from composition.sampling import Result

__all__ = [
    "METHODS",
    "AdapterBank",
    "CompositionError",
    "Concept",
    "ConceptPrompt",
    "Result",
    "generate",
    "method_options",
]
