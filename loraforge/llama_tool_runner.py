"""Run llama-perplexity's entry point in a fresh Python process, then drain llama.cpp's log.

llama.cpp's common logger prints from a background thread and is deliberately never destroyed
(common/log.cpp, common_log_main: "this design may cause logs to be lost if not flushed before
the program exits", llama.cpp#22142). On a loaded machine the tool's last lines, which carry the
final perplexity and the KL-divergence statistics, were lost from runs that exited 0 (3 runs of
5 at a load of 17 on 2 cores). The tool binary is only `main() { return llama_perplexity(argc,
argv); }` over libllama-perplexity-impl.so, so this runner calls that function through ctypes,
then `common_log_pause(common_log_main())` (which drains the queue and joins the thread) and
flushes C's stdio before exiting with the tool's status.

    python -m loraforge.llama_tool_runner ARGS...     (the environment of llamacpp.llama_tool_env)
"""

from __future__ import annotations

import ctypes
import os
import sys
import sysconfig
from pathlib import Path

# C++ symbols of the pinned build (llama-cpp-python 0.3.36): int llama_perplexity(int, char **),
# common_log * common_log_main(), void common_log_pause(common_log *)
ENTRY = "_Z16llama_perplexityiPPc"
LOG_MAIN = "_Z15common_log_mainv"
LOG_PAUSE = "_Z16common_log_pauseP10common_log"


def library_dir() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / "lib"


# loaded in dependency order, so each finds the ones before it without LD_LIBRARY_PATH
LIBRARIES = ("libggml-base.so", "libggml-cpu.so", "libggml.so", "libllama.so", "libllama-common.so",
             "libllama-perplexity-impl.so")


def _load() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    libs = {name: ctypes.CDLL(str(library_dir() / name), mode=ctypes.RTLD_GLOBAL) for name in LIBRARIES}
    return libs["libllama-perplexity-impl.so"], libs["libllama-common.so"]


def available() -> bool:
    """Whether the pinned build's entry point and logger symbols are there (else: the binary)."""
    try:
        impl, common = _load()
        return all(hasattr(lib, sym) for lib, sym in ((impl, ENTRY), (common, LOG_MAIN), (common, LOG_PAUSE)))
    except OSError:
        return False


def main(argv: list[str]) -> int:
    impl, common = _load()
    entry = getattr(impl, ENTRY)
    entry.restype = ctypes.c_int
    args = [b"llama-perplexity", *(a.encode() for a in argv)]
    rc = entry(len(args), (ctypes.c_char_p * (len(args) + 1))(*args, None))
    log_main, log_pause = getattr(common, LOG_MAIN), getattr(common, LOG_PAUSE)
    log_main.restype = ctypes.c_void_p
    log_pause.argtypes = [ctypes.c_void_p]
    log_pause(log_main())  # drain every queued line, join the log thread
    ctypes.CDLL(None).fflush(None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    main(sys.argv[1:])
