"""Limits and low-level checks of a sparsecraft model file, applied before anything is built.

A file's checksum proves it is undamaged, not that it is harmless: anyone can
write a file with a valid checksum. So :func:`load` bounds what a header may
ask for before it builds anything, and refuses beyond these limits with a
``ValueError`` (issue 10, item 7: a 6 MB header with one long literal list took
1.4 GB and 8 s to load). Each limit is far above what a real model needs:

* ``MAX_HEADER_BYTES``: the safetensors JSON header (tensor index + metadata);
* ``MAX_DEPTH``: nesting of the structure JSON (nested Sequentials, arguments);
* ``MAX_VALUES``: JSON values (numbers, strings, lists, ...) in the structure;
* ``MAX_NODES`` / ``MAX_MODULES``: graph nodes, layers and containers;
* ``MAX_LITERAL``: elements of one literal list or tuple in a graph argument;
* ``MAX_ARGUMENTS``: literal elements in all graph arguments together (code
  generation in ``torch.fx`` costs about 10 µs and 1 kB per element);
* ``MAX_STRING``: characters of one string (names, targets, settings).
"""

from __future__ import annotations

import json
import keyword
import os
import stat
import struct
from typing import Any

MAX_HEADER_BYTES = 16 * 2**20
MAX_DEPTH = 64
MAX_VALUES = 250_000
MAX_NODES = 10_000
MAX_MODULES = 10_000
MAX_LITERAL = 1_024
MAX_ARGUMENTS = 100_000
MAX_STRING = 1_024


def invalid(what: str) -> ValueError:
    """The error of a file that is not a valid sparsecraft model file."""
    return ValueError(f"Expected a valid sparsecraft model file. Received: {what}")


def is_name(text: Any) -> bool:
    """A plain Python identifier that is not a keyword: safe in generated code."""
    return isinstance(text, str) and text.isidentifier() and not keyword.iskeyword(text) \
        and text.isascii()


def is_path(text: Any) -> bool:
    """A dotted module path whose parts are names or digits (``"blocks.0.fc"``)."""
    return isinstance(text, str) and len(text) <= MAX_STRING and all(
        is_name(part) or (part.isdigit() and part.isascii()) for part in text.split(".")
    )


def check_regular_file(path: str) -> None:
    """Refuses a missing path, a directory, a FIFO or a device before opening it.

    Opening a FIFO blocks until a writer appears, so the type is checked with
    ``stat`` first.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If ``path`` is not a regular file.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"Expected an existing file. Received: path={path!r}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (FIFO, device, ...)"
        raise ValueError(f"Expected a regular file. Received: path={path!r}, which is {kind}")


def check_header_size(path: str) -> None:
    """Reads the 8-byte header length of a safetensors file and refuses a huge header.

    Raises:
        ValueError: If the file is shorter than 8 bytes or its header exceeds
            ``MAX_HEADER_BYTES``.
    """
    # O_NONBLOCK: even if the path was swapped for a FIFO after the stat, never block
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"Expected a regular file. Received: path={path!r}")
        head = os.read(fd, 8)
    finally:
        os.close(fd)
    if len(head) < 8:
        raise ValueError(f"Expected a complete safetensors file. Received: path={path!r} of "
                         f"{len(head)} bytes")
    (size,) = struct.unpack("<Q", head)
    if size > MAX_HEADER_BYTES:
        raise invalid(f"a header of {size} bytes (the limit is {MAX_HEADER_BYTES})")


def parse_structure(header: str) -> Any:
    """Parses the structure JSON and checks depth, value count and string lengths.

    Raises:
        ValueError: If the header is not JSON or exceeds a limit.
    """
    try:
        structure = json.loads(header)
    except RecursionError:  # the C parser stops at the interpreter's recursion limit
        raise invalid(f"a structure nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as err:
        raise invalid(f"a structure header that is not JSON ({err})") from err
    count, stack = 1, [(structure, 1)]
    while stack:  # iterative, so that a deep document cannot exhaust the Python stack
        value, depth = stack.pop()
        if type(value) is dict:
            children = [*value, *value.values()]  # keys are strings to check too
        elif type(value) is list:
            children = value
        else:
            _check_string(value)
            continue
        count += len(children)
        if count > MAX_VALUES:
            raise invalid(f"a structure of more than {MAX_VALUES} values")
        for child in children:
            if type(child) is dict or type(child) is list:
                if depth >= MAX_DEPTH:
                    raise invalid(f"a structure nested deeper than {MAX_DEPTH} levels")
                stack.append((child, depth + 1))
            elif type(child) is str and len(child) > MAX_STRING:
                _check_string(child)
    return structure


def _check_string(value: Any) -> None:
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise invalid(f"a string of {len(value)} characters (the limit is {MAX_STRING})")


def check_count(what: str, n: int, limit: int) -> None:
    """Refuses more than ``limit`` items of a kind (nodes, modules, literal elements)."""
    if n > limit:
        raise invalid(f"{n} {what} (the limit is {limit})")
