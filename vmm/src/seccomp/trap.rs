//! `--seccomp kill`: the SIGSYS handler that names a forbidden syscall and its thread, then
//! ends the process with [`EXIT_BAD_SYSCALL`].
//!
//! The handler runs under the filter of the thread that tripped it, so it makes only two
//! syscalls, `write` and `exit_group`, which every list allows. It allocates nothing and takes
//! no lock: the thread's name was copied into a thread-local buffer when its filter went in.

use std::cell::Cell;

use super::SeccompError;

/// The exit status of a vmm whose thread made a syscall its list forbids (`--seccomp kill`):
/// 128 + SIGSYS, what a shell shows for a process killed by SIGSYS, which is what this is,
/// with a message first.
pub const EXIT_BAD_SYSCALL: i32 = 128 + libc::SIGSYS;

/// `si_code` of a SIGSYS raised by a seccomp filter (linux/uapi/asm-generic/siginfo.h).
const SYS_SECCOMP: i32 = 1;

/// Where `int _syscall` sits in an x86-64 `siginfo_t`: after si_signo, si_errno, si_code and
/// padding (16 bytes), then `void *_call_addr` (8) (linux/uapi/asm-generic/siginfo.h).
const SI_SYSCALL_OFFSET: usize = 24;

thread_local! {
    /// The thread's name, NUL-padded. Const-initialised and without a destructor: reading it
    /// touches only the thread's TLS block, which is safe in a signal handler.
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Copies the calling thread's name where the handler can read it.
pub(super) fn remember_thread_name() {
    let mut buf = [0u8; 16];
    let current = std::thread::current();
    let name = current.name().unwrap_or("unnamed").as_bytes();
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name[..n]);
    NAME.with(|c| c.set(buf));
}

/// Installs the SIGSYS handler for the whole process (signal dispositions are per process).
pub(super) fn install_handler() -> Result<(), SeccompError> {
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) that is filled in
    // below before use.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = sigsys_handler as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act` is a valid sigaction whose handler is an `extern "C"` function of the
    // SA_SIGINFO signature that only makes async-signal-safe calls; no old action is asked for.
    let rc = unsafe {
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Appends `s` to `buf` at `*len`, cutting what does not fit.
fn push(buf: &mut [u8], len: &mut usize, s: &[u8]) {
    let room = buf.len().saturating_sub(*len);
    let n = s.len().min(room);
    buf[*len..*len + n].copy_from_slice(&s[..n]);
    *len += n;
}

/// Appends `v` in decimal.
fn push_decimal(buf: &mut [u8], len: &mut usize, v: i64) {
    if v < 0 {
        push(buf, len, b"-");
    }
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut u = v.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    push(buf, len, &digits[i..]);
}

/// The handler's message: fixed text, the thread's name and the syscall number.
pub(super) fn message(buf: &mut [u8; 256], name: &[u8; 16], seccomp: bool, nr: i64) -> usize {
    let mut len = 0;
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    push(buf, &mut len, b"vmm: seccomp: thread '");
    push(buf, &mut len, &name[..name_len]);
    if seccomp {
        push(buf, &mut len, b"' made syscall ");
        push_decimal(buf, &mut len, nr);
        push(
            buf,
            &mut len,
            b", which its filter forbids (--seccomp kill); the vmm exits\n",
        );
    } else {
        push(
            buf,
            &mut len,
            b"' got a SIGSYS not sent by seccomp; the vmm exits\n",
        );
    }
    len
}

extern "C" fn sigsys_handler(
    _signo: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; the fields read
    // are plain integers at their x86-64 offsets, read unaligned so no alignment is assumed.
    let (code, nr) = unsafe {
        let base = info.cast::<u8>();
        let code = (*info).si_code;
        let nr = base.add(SI_SYSCALL_OFFSET).cast::<i32>().read_unaligned();
        (code, nr)
    };
    let name = NAME.try_with(|c| c.get()).unwrap_or([0; 16]);
    let mut buf = [0u8; 256];
    let len = message(&mut buf, &name, code == SYS_SECCOMP, i64::from(nr));
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf` is valid for `len` bytes.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_BAD_SYSCALL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_thread_and_the_syscall() {
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu0");
        let mut buf = [0u8; 256];
        let n = message(&mut buf, &name, true, 41);
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert_eq!(
            text,
            "vmm: seccomp: thread 'vcpu0' made syscall 41, which its filter forbids \
             (--seccomp kill); the vmm exits\n"
        );
        let n = message(&mut buf, &[b'x'; 16], false, 0);
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .starts_with("vmm: seccomp: thread 'xxxxxxxxxxxxxxxx' got a SIGSYS"));
    }

    #[test]
    fn decimals_of_any_sign() {
        for (v, s) in [(0i64, "0"), (7, "7"), (435, "435"), (-1, "-1")] {
            let mut buf = [0u8; 32];
            let mut len = 0;
            push_decimal(&mut buf, &mut len, v);
            assert_eq!(&buf[..len], s.as_bytes());
        }
    }
}
