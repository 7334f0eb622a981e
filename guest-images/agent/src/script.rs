//! Parsing: the kernel command line, scripts (`;`-separated commands) and single commands
//! (`,`-separated arguments). Pure functions, tested on the host.

use std::fmt;

use guest_abi::agent::CMDLINE_KEY;

use crate::gpu::{self, GpuCommand};
use crate::workload::{Pattern, Spec};

/// One agent command (see the crate docs for what each prints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Cpus,
    Meminfo,
    BlkRead {
        dev: String,
        offset: u64,
        len: u64,
    },
    BlkWrite {
        dev: String,
        offset: u64,
        len: u64,
        seed: u64,
    },
    Workload(Spec),
    WorkloadVerify,
    WorkloadStop,
    Echo(String),
    Sleep {
        ms: u64,
    },
    Sh,
    Poweroff,
    Reboot,
    PciList,
    Vfio(GpuCommand),
}

/// A command that could not be parsed: printed as `AGENT: error <cmd>: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub cmd: String,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error {}: {}", self.cmd, self.reason)
    }
}

/// The agent script in a kernel command line: the value of `vmm.agent=`, if present. Follows
/// the kernel's own splitting: words separated by whitespace, double quotes group (and are
/// removed), so `vmm.agent="echo,a b"` works too. The last occurrence wins, as for the kernel.
pub fn script_from_cmdline(cmdline: &str) -> Option<String> {
    cmdline_words(cmdline)
        .into_iter()
        .filter_map(|word| word.strip_prefix(CMDLINE_KEY).map(str::to_owned))
        .next_back()
}

fn cmdline_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    let mut in_word = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                in_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// The commands of a script or an input line: split at `;`, trimmed, empty ones dropped.
pub fn split_script(script: &str) -> impl Iterator<Item = &str> {
    script.split(';').map(str::trim).filter(|c| !c.is_empty())
}

/// Parses one command (`name,arg,arg...`).
pub fn parse_command(text: &str) -> Result<Command, ParseError> {
    let mut parts = text.split(',');
    let name = parts.next().unwrap_or_default().trim();
    let args: Vec<&str> = parts.map(str::trim).collect();
    let err = |reason: String| ParseError {
        cmd: name.to_owned(),
        reason,
    };
    let want = |n: usize| -> Result<(), ParseError> {
        if args.len() == n {
            Ok(())
        } else {
            Err(err(format!("takes {n} argument(s), got {}", args.len())))
        }
    };
    let num = |i: usize, what: &str| -> Result<u64, ParseError> {
        parse_u64(args[i]).ok_or_else(|| err(format!("bad {what} {:?}", args[i])))
    };
    let cmd = match name {
        "cpus" => want(0).map(|()| Command::Cpus)?,
        "meminfo" => want(0).map(|()| Command::Meminfo)?,
        "blkread" => {
            want(3)?;
            Command::BlkRead {
                dev: device(args[0]).map_err(err)?,
                offset: num(1, "offset")?,
                len: num(2, "length")?,
            }
        }
        "blkwrite" => {
            want(4)?;
            Command::BlkWrite {
                dev: device(args[0]).map_err(err)?,
                offset: num(1, "offset")?,
                len: num(2, "length")?,
                seed: num(3, "seed")?,
            }
        }
        "workload" => {
            if !(3..=4).contains(&args.len()) {
                return Err(err(format!(
                    "takes SIZE_MIB,PATTERN,PASSES[,RATE_MIB_S], got {} argument(s)",
                    args.len()
                )));
            }
            let size_mib = num(0, "size")?;
            if size_mib == 0 {
                return Err(err("size must be at least 1 MiB".into()));
            }
            let pattern: Pattern = args[1].parse().map_err(err)?;
            let passes = num(2, "pass count")?;
            let rate_mib_s = if args.len() == 4 {
                Some(num(3, "rate")?).filter(|&r| r != 0)
            } else {
                None
            };
            Command::Workload(Spec {
                size_mib,
                pattern,
                passes,
                rate_mib_s,
            })
        }
        "workload-verify" => want(0).map(|()| Command::WorkloadVerify)?,
        "workload-stop" => want(0).map(|()| Command::WorkloadStop)?,
        // The text is everything after the first comma, commas included.
        "echo" => Command::Echo(text.split_once(',').map_or("", |(_, t)| t).to_owned()),
        "sleep" => {
            want(1)?;
            Command::Sleep {
                ms: num(0, "duration")?,
            }
        }
        "sh" => want(0).map(|()| Command::Sh)?,
        "poweroff" => want(0).map(|()| Command::Poweroff)?,
        "reboot" => want(0).map(|()| Command::Reboot)?,
        "pci-list" => want(0).map(|()| Command::PciList)?,
        n if n.starts_with("vfio-") => Command::Vfio(gpu::parse(n, &args).map_err(err)?),
        _ => return Err(err("unknown command".into())),
    };
    Ok(cmd)
}

/// Decimal, or hexadecimal with `0x`.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn device(arg: &str) -> Result<String, String> {
    if arg.is_empty() {
        Err("empty device path".into())
    } else {
        Ok(arg.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_script_in_a_cmdline() {
        let line = "console=ttyS0 reboot=k vmm.agent=cpus;meminfo;echo,hi panic=1\n";
        assert_eq!(
            script_from_cmdline(line).as_deref(),
            Some("cpus;meminfo;echo,hi")
        );
        assert_eq!(script_from_cmdline("console=ttyS0 quiet"), None);
        assert_eq!(
            script_from_cmdline(r#"a vmm.agent="echo,a b;cpus" b"#).as_deref(),
            Some("echo,a b;cpus")
        );
        assert_eq!(
            script_from_cmdline("vmm.agent=a vmm.agent=b").as_deref(),
            Some("b")
        );
        assert_eq!(script_from_cmdline("xvmm.agent=a").as_deref(), None);
        assert_eq!(script_from_cmdline("vmm.agent=").as_deref(), Some(""));
    }

    #[test]
    fn splits_scripts_into_commands() {
        let cmds: Vec<_> = split_script(" cpus ;; meminfo;\r").collect();
        assert_eq!(cmds, ["cpus", "meminfo"]);
        assert_eq!(split_script("").count(), 0);
    }

    #[test]
    fn parses_every_command() {
        let ok = |s| parse_command(s).expect(s);
        assert_eq!(ok("cpus"), Command::Cpus);
        assert_eq!(ok("meminfo"), Command::Meminfo);
        assert_eq!(
            ok("blkread,/dev/vda,0x200,4096"),
            Command::BlkRead {
                dev: "/dev/vda".into(),
                offset: 512,
                len: 4096
            }
        );
        assert_eq!(
            ok("blkwrite, /dev/vdb ,0,10,7"),
            Command::BlkWrite {
                dev: "/dev/vdb".into(),
                offset: 0,
                len: 10,
                seed: 7
            }
        );
        assert_eq!(
            ok("workload,64,hotset,0,100"),
            Command::Workload(Spec {
                size_mib: 64,
                pattern: Pattern::Hotset,
                passes: 0,
                rate_mib_s: Some(100)
            })
        );
        assert_eq!(
            ok("workload,1,sweep,3,0"),
            Command::Workload(Spec {
                size_mib: 1,
                pattern: Pattern::Sweep,
                passes: 3,
                rate_mib_s: None
            })
        );
        assert_eq!(ok("workload-verify"), Command::WorkloadVerify);
        assert_eq!(ok("workload-stop"), Command::WorkloadStop);
        assert_eq!(ok("echo,a,b c"), Command::Echo("a,b c".into()));
        assert_eq!(ok("echo"), Command::Echo(String::new()));
        assert_eq!(ok("sleep,250"), Command::Sleep { ms: 250 });
        assert_eq!(ok("sh"), Command::Sh);
        assert_eq!(ok("poweroff"), Command::Poweroff);
        assert_eq!(ok("reboot"), Command::Reboot);
        assert_eq!(ok("pci-list"), Command::PciList);
        assert!(matches!(ok("vfio-msix, 00:01.0 ,8"), Command::Vfio(_)));
    }

    #[test]
    fn reports_bad_commands() {
        let err = |s| parse_command(s).expect_err(s).to_string();
        assert_eq!(err("frobnicate,1"), "error frobnicate: unknown command");
        assert_eq!(err("vfio-frob,1"), "error vfio-frob: unknown command");
        assert_eq!(
            err("vfio-dma,00:01.0"),
            "error vfio-dma: takes BDF,BYTES, got 1 argument(s)"
        );
        assert_eq!(
            err("pci-list,x"),
            "error pci-list: takes 0 argument(s), got 1"
        );
        assert_eq!(err("cpus,1"), "error cpus: takes 0 argument(s), got 1");
        assert_eq!(
            err("blkread,/dev/vda,x,1"),
            "error blkread: bad offset \"x\""
        );
        assert_eq!(err("blkread,,0,1"), "error blkread: empty device path");
        assert_eq!(err("sleep,-1"), "error sleep: bad duration \"-1\"");
        assert!(err("workload,0,sweep,1").contains("at least 1 MiB"));
        assert!(err("workload,1,sparse,1").contains("unknown pattern"));
        assert!(err("workload,1,sweep").contains("SIZE_MIB,PATTERN,PASSES"));
        assert_eq!(
            err("blkwrite,/dev/vda,0,99999999999999999999,1"),
            "error blkwrite: bad length \"99999999999999999999\""
        );
    }

    #[test]
    fn parses_numbers() {
        assert_eq!(parse_u64("0"), Some(0));
        assert_eq!(parse_u64("0x1F"), Some(31));
        assert_eq!(parse_u64("12a"), None);
        assert_eq!(parse_u64(""), None);
        assert_eq!(parse_u64("0x"), None);
    }
}
