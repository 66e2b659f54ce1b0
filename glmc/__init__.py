"""glmc: a compiler for GLM-family language models.

    import glmc
    path = glmc.compile("tiny-glm", target="cpu")
    model = glmc.load(path)
    model.generate([[5, 6, 7]], max_new_tokens=16)
"""

__version__ = "0.1.0"


def compile(model, output=None, **options):
    """Compile a checkpoint directory or preset name; return the artifact path. See glmc.compiler.compile."""
    from glmc.compiler import compile as _compile

    return _compile(model, output, **options)


def load(path, verify: bool = True, threads: int | None = None, prefill_chunk: int | None = None):
    """Load a compiled artifact and return a glmc.runtime.Runtime (threads and prefill_chunk
    default to what `glmc tune` measured for the artifact, else all CPUs / one call)."""
    from glmc.runtime import load as _load

    return _load(path, verify=verify, threads=threads, prefill_chunk=prefill_chunk)


__all__ = ["compile", "load", "__version__"]
