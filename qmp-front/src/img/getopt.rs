//! GNU `getopt_long` as qemu-img uses it, so every subcommand parses its
//! command line (and reports mistakes) the way qemu-img does.
//!
//! Semantics kept from glibc: options and operands may be mixed (operands
//! are collected in order), `--` ends option parsing, short options cluster
//! (`-wU`) and take their argument attached or as the next word (`-c3`,
//! `-c 3`), long options take `--name=value` or `--name value`, and a long
//! option may be abbreviated to any unambiguous prefix (an exact match always
//! wins). Error texts are glibc's, prefixed with the program name the caller
//! gives (qemu-img passes `"qemu-img bench"` as `argv[0]`).

/// Whether an option takes an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HasArg {
    /// A flag.
    No,
    /// Needs a value.
    Required,
}

/// A long option: its name, whether it takes a value, and the id it yields.
#[derive(Debug, Clone, Copy)]
pub struct LongOpt {
    /// Name without the leading `--`.
    pub name: &'static str,
    /// Whether it takes a value.
    pub has_arg: HasArg,
    /// What [`Parsed::Opt`] reports: a short option character, or an id
    /// above `0xff` for long-only options.
    pub id: u32,
}

impl LongOpt {
    /// A long option without a value.
    pub const fn flag(name: &'static str, id: u32) -> LongOpt {
        LongOpt {
            name,
            has_arg: HasArg::No,
            id,
        }
    }

    /// A long option that takes a value.
    pub const fn value(name: &'static str, id: u32) -> LongOpt {
        LongOpt {
            name,
            has_arg: HasArg::Required,
            id,
        }
    }
}

/// One parsed option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The option's id (short options: their character).
    pub id: u32,
    /// Its value, if it takes one.
    pub arg: Option<String>,
}

/// The result of a successful parse.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Matches {
    /// Options in command-line order.
    pub opts: Vec<Parsed>,
    /// Operands (non-option words) in order.
    pub operands: Vec<String>,
}

/// A command-line mistake, with glibc's message (without the program name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GetoptError {
    /// `-x` with an unknown `x`.
    #[error("invalid option -- '{0}'")]
    InvalidShort(char),
    /// `--name` that matches no long option.
    #[error("unrecognized option '--{0}'")]
    Unrecognized(String),
    /// A prefix that matches several long options.
    #[error("option '--{given}' is ambiguous; possibilities:{}", .candidates.iter().map(|c| format!(" '--{c}'")).collect::<String>())]
    Ambiguous {
        /// What was typed.
        given: String,
        /// Matching option names, in table order.
        candidates: Vec<&'static str>,
    },
    /// A short option without its required value.
    #[error("option requires an argument -- '{0}'")]
    MissingShortArg(char),
    /// A long option without its required value.
    #[error("option '--{0}' requires an argument")]
    MissingLongArg(&'static str),
    /// `--flag=value` for an option that takes none.
    #[error("option '--{0}' doesn't allow an argument")]
    UnexpectedArg(&'static str),
}

/// Parses `args` (without the program and subcommand names) against the
/// short option string `shorts` (getopt syntax: `c:` takes a value) and the
/// table `longs`. Stops at the first error, as getopt callers do.
pub fn getopt_long(
    args: &[String],
    shorts: &str,
    longs: &[LongOpt],
) -> Result<Matches, GetoptError> {
    let mut m = Matches::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            m.operands.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(body) = a.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (body, None),
            };
            let opt = find_long(name, longs)?;
            let arg = match (opt.has_arg, inline) {
                (HasArg::No, Some(_)) => return Err(GetoptError::UnexpectedArg(opt.name)),
                (HasArg::No, None) => None,
                (HasArg::Required, Some(v)) => Some(v),
                (HasArg::Required, None) => match args.get(i) {
                    Some(v) => {
                        i += 1;
                        Some(v.clone())
                    }
                    None => return Err(GetoptError::MissingLongArg(opt.name)),
                },
            };
            m.opts.push(Parsed { id: opt.id, arg });
            continue;
        }
        if a.len() < 2 || !a.starts_with('-') {
            m.operands.push(a.clone());
            continue;
        }
        let chars: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            j += 1;
            let takes = short_takes_arg(shorts, c).ok_or(GetoptError::InvalidShort(c))?;
            if !takes {
                m.opts.push(Parsed {
                    id: c as u32,
                    arg: None,
                });
                continue;
            }
            let arg = if j < chars.len() {
                chars[j..].iter().collect()
            } else {
                match args.get(i) {
                    Some(v) => {
                        i += 1;
                        v.clone()
                    }
                    None => return Err(GetoptError::MissingShortArg(c)),
                }
            };
            m.opts.push(Parsed {
                id: c as u32,
                arg: Some(arg),
            });
            break;
        }
    }
    Ok(m)
}

/// `Some(takes_arg)` if `c` is in the getopt string.
fn short_takes_arg(shorts: &str, c: char) -> Option<bool> {
    if c == ':' {
        return None;
    }
    let mut it = shorts.chars().peekable();
    while let Some(x) = it.next() {
        let takes = it.peek() == Some(&':');
        if takes {
            it.next();
        }
        if x == c {
            return Some(takes);
        }
    }
    None
}

fn find_long<'a>(name: &str, longs: &'a [LongOpt]) -> Result<&'a LongOpt, GetoptError> {
    if let Some(o) = longs.iter().find(|o| o.name == name) {
        return Ok(o);
    }
    let cands: Vec<&LongOpt> = longs.iter().filter(|o| o.name.starts_with(name)).collect();
    match cands.as_slice() {
        [] => Err(GetoptError::Unrecognized(name.to_owned())),
        [one] => Ok(one),
        many => {
            // glibc only complains when the candidates differ in meaning.
            let first = many[0];
            if many
                .iter()
                .all(|o| o.id == first.id && o.has_arg == first.has_arg)
            {
                Ok(first)
            } else {
                Err(GetoptError::Ambiguous {
                    given: name.to_owned(),
                    candidates: many.iter().map(|o| o.name).collect(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONGS: &[LongOpt] = &[
        LongOpt::value("format", 'f' as u32),
        LongOpt::value("flush-interval", 300),
        LongOpt::flag("write", 'w' as u32),
    ];

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn mixes_operands_clusters_and_prefixes() {
        let m = getopt_long(
            &args(&["img", "-wc3", "--form", "raw", "--fl=9", "--", "-x"]),
            "c:f:w",
            LONGS,
        )
        .unwrap();
        assert_eq!(m.operands, args(&["img", "-x"]));
        let ids: Vec<u32> = m.opts.iter().map(|p| p.id).collect();
        assert_eq!(ids, vec!['w' as u32, 'c' as u32, 'f' as u32, 300]);
        assert_eq!(m.opts[1].arg.as_deref(), Some("3"));
        assert_eq!(m.opts[3].arg.as_deref(), Some("9"));
    }

    #[test]
    fn glibc_errors() {
        let e = |a: &[&str]| getopt_long(&args(a), "c:w", LONGS).unwrap_err().to_string();
        assert_eq!(e(&["-x"]), "invalid option -- 'x'");
        assert_eq!(e(&["-c"]), "option requires an argument -- 'c'");
        assert_eq!(e(&["--bogus"]), "unrecognized option '--bogus'");
        assert_eq!(
            e(&["--write=1"]),
            "option '--write' doesn't allow an argument"
        );
        assert_eq!(e(&["--format"]), "option '--format' requires an argument");
        assert_eq!(
            e(&["--f"]),
            "option '--f' is ambiguous; possibilities: '--format' '--flush-interval'"
        );
    }
}
