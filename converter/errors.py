"""The one exception type users see: a clear, one-line reason (the CLI prints it and exits 2)."""


class ConversionError(Exception):
    """Bad input or an unsupported feature; the message names the field, file or tensor."""


def causes(exc: BaseException):
    """exc and every exception behind it, nearest first: each rank's failure inside a DCP CheckpointException
    (`failures`: rank -> (exception, stack); a BaseException whose own text says nothing), __cause__, __context__."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for _, f in sorted(failures.items())]
        todo += [e.__cause__, e.__context__]


def root_failure(exc: BaseException) -> BaseException:
    """What really failed: the first ConversionError behind exc, else the first exception that wraps nothing."""
    found = list(causes(exc))
    return next((e for e in found if isinstance(e, ConversionError)), None) or next(
        (e for e in found if not isinstance(getattr(e, "failures", None), dict)), exc)


def one_line(exc: BaseException, limit: int = 400) -> str:
    """exc's root failure as one line ("Type: text"; a ConversionError's text alone)."""
    e = root_failure(exc)
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[:limit] + " ..."
    return text if isinstance(e, ConversionError) else f"{type(e).__name__}: {text}"
