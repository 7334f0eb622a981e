//! `--user UID[:GID]|NAME[:GROUP]`: the vmm gives up root once the VM is set up.
//!
//! The drop runs on the main thread in `Machine::run`, after the VM, its memory, its disks,
//! its devices and the API socket exist and before any vCPU runs: everything that needs root
//! (/dev/kvm, VFIO, binding the socket) is open by then. glibc applies setgroups/setgid/setuid
//! to every thread of the process (it signals each to make the same call), so the threads
//! filtered before the drop allow those three syscalls when --user is given, and only then.

use std::ffi::CString;

use super::SeccompError;

/// Whom to become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

/// The uid and primary gid of the passwd entry `name` (a user name or a number).
fn passwd_entry(name: &str) -> Option<(u32, u32)> {
    let mut pwd: libc::passwd = unsafe_zeroed_passwd();
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let rc = match name.parse::<u32>() {
        // SAFETY: `pwd`, `buf` and `out` are valid for writes of their sizes for the call.
        Ok(uid) => unsafe {
            libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut out)
        },
        Err(_) => {
            let c = CString::new(name).ok()?;
            // SAFETY: as above, and `c` is a NUL-terminated string that outlives the call.
            unsafe { libc::getpwnam_r(c.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut out) }
        }
    };
    (rc == 0 && !out.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

/// The gid of the group `name` (a group name or a number).
fn group_id(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Some(gid);
    }
    let c = CString::new(name).ok()?;
    // SAFETY: an all-zero group is a valid value for getgrnam_r to fill in.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: `grp`, `buf` and `out` are valid for writes of their sizes, `c` outlives the call.
    let rc =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    (rc == 0 && !out.is_null()).then_some(grp.gr_gid)
}

fn unsafe_zeroed_passwd() -> libc::passwd {
    // SAFETY: an all-zero passwd (null pointers, zero ids) is a valid value to be filled in.
    unsafe { std::mem::zeroed() }
}

impl std::str::FromStr for User {
    type Err = SeccompError;

    /// `UID`, `UID:GID`, `NAME` or `NAME:GROUP`. Without a group: the user's primary group
    /// from passwd, or for a uid passwd does not know, the gid of the same number.
    fn from_str(s: &str) -> Result<User, SeccompError> {
        let bad = |why: &str| SeccompError::User {
            spec: s.to_string(),
            why: why.to_string(),
        };
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(bad("expected UID[:GID] or NAME[:GROUP]"));
        }
        let entry = passwd_entry(user);
        let uid = match (user.parse::<u32>(), entry) {
            (Ok(uid), _) => uid,
            (Err(_), Some((uid, _))) => uid,
            (Err(_), None) => return Err(bad("no such user")),
        };
        let gid = match group {
            Some(g) => group_id(g).ok_or_else(|| bad("no such group"))?,
            None => entry.map_or(uid, |(_, gid)| gid),
        };
        if uid == 0 || gid == 0 {
            return Err(bad("root is what --user gives up: name another user"));
        }
        Ok(User { uid, gid })
    }
}

/// The process's real, effective and saved ids.
fn ids() -> ([libc::uid_t; 3], [libc::gid_t; 3]) {
    let (mut ru, mut eu, mut su) = (0, 0, 0);
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    // SAFETY: each pointer is valid for one write of its id type.
    unsafe {
        libc::getresuid(&mut ru, &mut eu, &mut su);
        libc::getresgid(&mut rg, &mut eg, &mut sg);
    }
    ([ru, eu, su], [rg, eg, sg])
}

/// Refuses `--user` for a vmm that is not root (it could not change user at the end anyway):
/// checked when the command line is read, not after the VM is built.
pub fn check_root() -> Result<(), SeccompError> {
    // SAFETY: geteuid cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(SeccompError::NotRoot { euid });
    }
    Ok(())
}

/// Becomes `user` for good: no supplementary groups, then the gid, then the uid (in that
/// order: after setuid the others are no longer allowed), then checks that root cannot be
/// taken back.
pub fn drop_to(user: User) -> Result<(), SeccompError> {
    let fail = |what: &'static str| SeccompError::Drop {
        what,
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: setgroups with a count of 0 reads no memory; setgid and setuid take plain ids.
    // glibc applies each to every thread of the process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail("setgroups([])"));
        }
        if libc::setgid(user.gid) != 0 {
            return Err(fail("setgid"));
        }
        if libc::setuid(user.uid) != 0 {
            return Err(fail("setuid"));
        }
    }
    let (uids, gids) = ids();
    if uids != [user.uid; 3] || gids != [user.gid; 3] {
        return Err(SeccompError::NotDropped(format!(
            "ids are now uid {uids:?}, gid {gids:?}"
        )));
    }
    // SAFETY: getgroups with a size of 0 only counts, writing nothing.
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if groups != 0 {
        return Err(SeccompError::NotDropped(format!(
            "{groups} supplementary groups remain"
        )));
    }
    // The raw syscall changes the calling thread only (no glibc broadcast): if it worked, this
    // thread alone would be root again, and the check fails the run.
    // SAFETY: setresuid/setresgid with plain ids; the result is only checked.
    let (back_uid, back_gid) = unsafe {
        (
            libc::syscall(libc::SYS_setresuid, 0, 0, 0),
            libc::syscall(libc::SYS_setresgid, 0, 0, 0),
        )
    };
    if back_uid == 0 || back_gid == 0 {
        return Err(SeccompError::NotDropped(
            "setresuid/setresgid(0) still succeed".into(),
        ));
    }
    tracing::info!("running as uid {}, gid {} from now on", user.uid, user.gid);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_names_and_refusals() {
        assert_eq!(
            "65534:65534".parse::<User>().unwrap(),
            User {
                uid: 65534,
                gid: 65534
            }
        );
        assert_eq!(
            "1234:99".parse::<User>().unwrap(),
            User { uid: 1234, gid: 99 }
        );
        // nobody is in every passwd this runs on; its group is whatever passwd says.
        let nobody = "nobody".parse::<User>().unwrap();
        assert_eq!(nobody.uid, 65534);
        for bad in [
            "",
            ":1",
            "1:",
            "0",
            "0:0",
            "5:0",
            "no-such-user-here",
            "1:no-such-group-x",
        ] {
            assert!(bad.parse::<User>().is_err(), "{bad:?}");
        }
    }
}
