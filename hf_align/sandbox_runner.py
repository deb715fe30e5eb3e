"""The program `verifiers.run_sandboxed` runs in a fresh `python -I` for each completion, in the sandbox's own
folder (its working directory). It reads and deletes its case file, limits itself (memory, CPU time, file size,
processes, core dumps), leaves the network namespace where the kernel lets it, installs an audit hook (which nothing
can remove) that refuses processes, signals, sockets, native code and writes outside its folder, and only then runs
the completion's code and the tests, reporting "<nonce> passed <passed> <total>" (or "<nonce> error <Exception>") to
a result file. Run as a script only: importing it does nothing.
"""

import json
import os
import resource
import sys


def main() -> None:
    with open("case.json") as f:
        case = json.load(f)
    os.remove("case.json")
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET: a namespace with no network interface
    except Exception:
        pass
    memory, cpu_s, file_bytes = case["memory_bytes"], case["cpu_s"], case["file_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    report = open("result", "w")

    HOME = os.path.realpath(os.getcwd())
    BLOCKED = {"os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.kill", "os.killpg",
               "subprocess.Popen", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit", "sys.addaudithook"}
    BLOCKED_PREFIXES = ("socket.", "ctypes.", "_posixsubprocess", "webbrowser")
    BLOCKED_IMPORTS = {"_posixsubprocess", "_ctypes"}
    PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
                   "os.truncate": (0,), "os.utime": (0,), "os.rename": (0, 1), "os.link": (0, 1), "os.symlink": (0, 1)}
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def inside(path):
        if isinstance(path, int):
            return False
        path = os.path.realpath(os.fsdecode(path))
        return path == HOME or path.startswith(HOME + os.sep)

    def guard(event, args):
        if event in BLOCKED or event.startswith(BLOCKED_PREFIXES):
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "import" and args[0] in BLOCKED_IMPORTS:
            raise PermissionError("sandbox: importing " + args[0] + " is not allowed")
        if event == "open" and not isinstance(args[0], int) and (args[2] or 0) & WRITE_FLAGS and not inside(args[0]):
            raise PermissionError("sandbox: writing outside the sandbox folder is not allowed")
        if event in PATH_EVENTS and not all(inside(args[i]) for i in PATH_EVENTS[event]):
            raise PermissionError("sandbox: " + event + " outside the sandbox folder is not allowed")

    sys.addaudithook(guard)

    def finish(line):
        report.write(case["nonce"] + " " + line)
        report.close()
        os._exit(0)  # no atexit handlers or threads of the completion's code run after the verdict

    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(case["code"], "<completion>", "exec"), namespace)
    except BaseException as error:
        finish("error " + type(error).__name__)
    passed = 0
    for test in case["tests"]:
        try:
            exec(compile(test, "<test>", "exec"), namespace)
            passed += 1
        except BaseException:
            pass
    finish("passed %d %d" % (passed, len(case["tests"])))


if __name__ == "__main__":
    main()
