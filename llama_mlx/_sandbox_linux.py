"""The Linux side of llama_mlx.sandbox, run as a script (`python -I -S _sandbox_linux.py < CONFIG+CODE`).

It is a separate, single-threaded process so that it can change its own credentials and namespaces,
which the chat process (with its threads) must not. It:

1. as root, gives up the real uid (the effective uid stays 0 so the Python installation remains
   readable): the kernel exempts real root from RLIMIT_NPROC;
2. enters new user, network, PID, IPC and UTS namespaces: no network, no view of other processes,
   and when the namespace's first process ends the kernel kills every process left in it;
3. forks that first process (the PID namespace's init) and waits for it; SIGTERM from the library
   kills it, and with it the whole tree, detached grandchildren included;
4. in it: resource limits (process count per user namespace, address space, CPU time), no new
   privileges, Landlock (files: read-only system and Python paths, read-write scratch folder) and a
   seccomp filter (no Unix sockets, which no namespace covers; no io_uring, which would bypass the
   filter; no kernel keyrings), then execs the interpreter.

A setup failure goes to the status pipe as one `error: ...` line. `--probe` sets everything up and
exits without running anything: the library asks it once whether this machine can confine.
"""

import ctypes
import json
import os
import resource
import signal
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
OVERFLOW_UID = 65534  # "nobody": the real uid root gives up

# Landlock (generic syscall numbers, the same on x86-64 and arm64) and its access rights by ABI.
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_MAKE_CHAR, FS_MAKE_BLOCK, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 6, 1 << 11, 1 << 14, 1 << 15
FS_ALL_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
FILE_ONLY = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # rights a file rule may carry
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2  # ABI 6

# seccomp: syscall numbers per architecture.
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7, "arm64": 0xC00000B7}
SYSCALLS = {  # socket, then the calls refused outright (io_uring_setup/enter/register, add_key, request_key, keyctl)
    "x86_64": (41, (425, 426, 427, 248, 249, 250)),
    "aarch64": (198, (425, 426, 427, 217, 218, 219)),
}
SYSCALLS["arm64"] = SYSCALLS["aarch64"]
AF_INET, AF_INET6 = 2, 10
EACCES, ENOSYS = 13, 38
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000


class SetupError(Exception):
    pass


def check(result, what):
    if result < 0:
        raise SetupError(f"{what}: {os.strerror(ctypes.get_errno())}")
    return result


def landlock_abi():
    abi = libc.syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                       ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 1:
        raise SetupError("Landlock is not available in this kernel (Linux 5.13 or later, with Landlock enabled)")
    return abi


def apply_landlock(read_paths, write_paths, device_paths):
    abi = landlock_abi()
    handled = FS_ALL_BY_ABI.get(abi, FS_ALL_BY_ABI[5])
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    # struct landlock_ruleset_attr: handled_access_fs, handled_access_net (ABI 4), scoped (ABI 6)
    attr = struct.pack("=QQQ", handled, 0, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    fd = check(libc.syscall(LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)),
               "landlock_create_ruleset")
    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    rules = [(p, read) for p in read_paths] + [(p, FS_READ_FILE | FS_WRITE_FILE) for p in device_paths]
    rules += [(p, handled & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK)) for p in write_paths]
    for path, access in rules:
        try:
            target = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # not on this system
        if not os.path.isdir(path):
            access &= FILE_ONLY
        rule = struct.pack("=Qi", access & handled, target)  # struct landlock_path_beneath_attr (packed)
        check(libc.syscall(LANDLOCK_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), rule,
                           ctypes.c_uint32(0)), f"landlock_add_rule {path}")
        os.close(target)
    check(libc.syscall(LANDLOCK_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(fd)
    return abi


def seccomp_filter():
    machine = os.uname().machine
    if machine not in SYSCALLS:
        raise SetupError(f"no seccomp filter for the {machine} architecture")
    socket_nr, refused = SYSCALLS[machine]

    def stmt(code, k):
        return struct.pack("=HBBI", code, 0, 0, k)

    def jeq(k, jt, jf):
        return struct.pack("=HBBI", 0x15, jt, jf, k)  # BPF_JMP|BPF_JEQ|BPF_K

    load, ret = 0x20, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_RET|BPF_K
    n = len(refused)
    # Jump offsets count from the next instruction; the last three instructions are returns.
    prog = [stmt(load, 4),  # seccomp_data.arch
            jeq(AUDIT_ARCH[machine], 1, 0),
            stmt(ret, SECCOMP_RET_ERRNO | ENOSYS),  # another ABI (i386 on x86-64): nothing
            stmt(load, 0),  # seccomp_data.nr
            struct.pack("=HBBI", 0x35, 0, 1, 0x40000000),  # BPF_JMP|BPF_JGE|BPF_K: x32 syscalls
            stmt(ret, SECCOMP_RET_ERRNO | ENOSYS)]
    prog += [jeq(nr, n - i + 5, 0) for i, nr in enumerate(refused)]  # -> ENOSYS
    prog += [jeq(socket_nr, 0, 4),  # not socket(2) -> allow
             stmt(load, 16),  # seccomp_data.args[0], low half: the address family
             jeq(AF_INET, 2, 0),  # -> allow (an empty network namespace)
             jeq(AF_INET6, 1, 0),
             stmt(ret, SECCOMP_RET_ERRNO | EACCES),  # Unix sockets and the rest
             stmt(ret, SECCOMP_RET_ALLOW),
             stmt(ret, SECCOMP_RET_ERRNO | ENOSYS)]
    code = b"".join(prog)
    buf = ctypes.create_string_buffer(code, len(code))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.addressof(buf))
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp")


def enter_namespaces():
    if os.getuid() == 0:
        os.setresuid(OVERFLOW_UID, 0, 0)  # real root is exempt from RLIMIT_NPROC
    uid, gid = os.geteuid(), os.getegid()
    check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS),
          "unshare (user, network and PID namespaces)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def confine(cfg):
    """In the PID namespace's init, before exec."""
    # The process count is per user namespace (Linux 5.14+): set it after entering one, so that only
    # the sandbox's own processes count.
    memory = cfg["memory_bytes"]
    for limit, value in ((resource.RLIMIT_NPROC, cfg["max_processes"]), (resource.RLIMIT_AS, memory),
                         (resource.RLIMIT_DATA, memory), (resource.RLIMIT_CPU, cfg["cpu_seconds"]),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    abi = apply_landlock(cfg["read_paths"], cfg["write_paths"], cfg["device_paths"])
    seccomp_filter()
    return abi


def read_config():
    """stdin: a 16-byte length, the JSON config, then the code, which the interpreter reads on from there."""
    size, data = int(os.read(0, 16)), b""
    while len(data) < size and (chunk := os.read(0, size - len(data))):
        data += chunk
    return json.loads(data)


def main():
    probe = sys.argv[1:] == ["--probe"]
    cfg = read_config()
    status = cfg["status_fd"]
    # The library stops a run with SIGTERM, which kills the namespace's init (and so everything in it)
    # once there is one; until then it waits, blocked.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        enter_namespaces()
    except (OSError, SetupError) as e:
        os.write(status, f"error: {e}\n".encode())
        sys.exit(125)
    pid = os.fork()
    if pid == 0:
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the launcher killed during setup: go too
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            os.closerange(3, status)
            os.closerange(status + 1, 1 << 16)
            os.chdir(cfg["cwd"])
            abi = confine(cfg)
            if probe:
                os.write(status, f"ok landlock {abi}\n".encode())
                os._exit(0)
            os.set_inheritable(status, False)  # closes at exec: EOF tells the library the code started
            os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
        except BaseException as e:  # noqa: BLE001 - whatever it is, it goes to the library as one line
            os.write(status, f"error: {e}\n".encode())
            os._exit(125)
    os.close(status)
    devnull = os.open("/dev/null", os.O_WRONLY)
    os.dup2(devnull, 1)  # only the code holds the output pipe: its end is EOF
    os.dup2(devnull, 2)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    # Wait without reaping, so that the pid cannot be reused while the handler may still kill it.
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    os._exit(info.si_status if info.si_code == os.CLD_EXITED else 128 + info.si_status)


if __name__ == "__main__":
    main()
