//! Numeric command-line arguments, parsed as qemu-img parses them.
//!
//! Two flavours: plain integers ([`parse_int`]: C's `strtoul` with base 0,
//! so `0x10` is hex and `010` octal) and sizes ([`parse_size`]: decimal or
//! hex, an optional binary suffix `b k M G T P E`, and a fraction only
//! together with a suffix other than `b`). Both accept leading white space
//! and a `+`, reject trailing garbage, and report with qemu-img's two
//! messages: "Invalid NAME specified: 'ARG'." for text that is no number and
//! "Invalid NAME specified. Must be between MIN and MAX." for a number out of
//! range (negative numbers included).

/// Why an argument was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumError {
    /// Not a number at all.
    #[error("Invalid {name} specified: '{arg}'.")]
    Invalid {
        /// What the number is ("request count").
        name: &'static str,
        /// The text given.
        arg: String,
    },
    /// A number, but outside `[min, max]`.
    #[error("Invalid {name} specified. Must be between {min} and {max}.")]
    Range {
        /// What the number is.
        name: &'static str,
        /// Smallest accepted value.
        min: i64,
        /// Largest accepted value.
        max: i64,
    },
}

/// What the text parsed to before the range check.
enum Raw {
    /// A value (saturated to `u64::MAX` on overflow).
    Value(u64),
    /// Negative or overflowing: always out of range.
    OutOfRange,
    /// Not a number.
    Invalid,
}

fn strip_ws(s: &str) -> &str {
    s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r'])
}

fn digits(s: &str, radix: u32) -> (Option<u64>, usize, bool) {
    // (value, bytes consumed, overflowed)
    let mut v: u64 = 0;
    let mut over = false;
    let mut n = 0;
    for c in s.chars() {
        let Some(d) = c.to_digit(radix) else { break };
        n += 1;
        match v
            .checked_mul(radix as u64)
            .and_then(|x| x.checked_add(d as u64))
        {
            Some(x) => v = x,
            None => over = true,
        }
    }
    (if n == 0 { None } else { Some(v) }, n, over)
}

fn raw_int(s: &str) -> Raw {
    let s = strip_ws(s);
    let (neg, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (radix, body) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if h.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            (16, h)
        } else {
            // strtoul reads the "0" and stops at the "x": trailing garbage.
            return Raw::Invalid;
        }
    } else if s.starts_with('0') {
        (8, s)
    } else {
        (10, s)
    };
    let (v, n, over) = digits(body, radix);
    match v {
        Some(v) if n == body.len() => {
            if over || (neg && v != 0) {
                Raw::OutOfRange
            } else {
                Raw::Value(v)
            }
        }
        _ => Raw::Invalid,
    }
}

fn raw_size(s: &str) -> Raw {
    let s = strip_ws(s);
    let s = match s.as_bytes().first() {
        Some(b'-') => {
            return if raw_size(&s[1..]).is_number() {
                Raw::OutOfRange
            } else {
                Raw::Invalid
            }
        }
        Some(b'+') => &s[1..],
        _ => s,
    };
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        // Hex takes neither a fraction nor a suffix.
        let (v, n, over) = digits(h, 16);
        return match v {
            Some(_) if n == h.len() && over => Raw::OutOfRange,
            Some(v) if n == h.len() => Raw::Value(v),
            _ => Raw::Invalid,
        };
    }
    let (int, n, over) = digits(s, 10);
    let Some(int) = int else { return Raw::Invalid };
    let mut rest = &s[n..];
    let mut frac: Option<f64> = None;
    if let Some(r) = rest.strip_prefix('.') {
        let (_, fnum, _) = digits(r, 10);
        let text = format!("0.{}", &r[..fnum]);
        frac = Some(text.parse().unwrap_or(0.0));
        rest = &r[fnum..];
    }
    let mul: u64 = match rest {
        "" => 1,
        "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return Raw::Invalid,
    };
    if frac.is_some() && mul == 1 {
        return Raw::Invalid;
    }
    if over {
        return Raw::OutOfRange;
    }
    let extra = frac.map_or(0, |f| (f * mul as f64) as u64);
    match int.checked_mul(mul).and_then(|v| v.checked_add(extra)) {
        Some(v) => Raw::Value(v),
        None => Raw::OutOfRange,
    }
}

impl Raw {
    fn is_number(&self) -> bool {
        !matches!(self, Raw::Invalid)
    }

    fn check(self, name: &'static str, arg: &str, min: i64, max: i64) -> Result<i64, NumError> {
        let range = NumError::Range { name, min, max };
        match self {
            Raw::Invalid => Err(NumError::Invalid {
                name,
                arg: arg.to_owned(),
            }),
            Raw::OutOfRange => Err(range),
            Raw::Value(v) => match i64::try_from(v) {
                Ok(v) if (min..=max).contains(&v) => Ok(v),
                _ => Err(range),
            },
        }
    }
}

/// Parses an integer argument (`strtoul`, base 0) within `[min, max]`.
pub fn parse_int(name: &'static str, arg: &str, min: i64, max: i64) -> Result<i64, NumError> {
    raw_int(arg).check(name, arg, min, max)
}

/// Parses a size argument (suffixes, fractions) within `[min, max]`.
pub fn parse_size(name: &'static str, arg: &str, min: i64, max: i64) -> Result<i64, NumError> {
    raw_size(arg).check(name, arg, min, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: i64 = i32::MAX as i64;

    #[test]
    fn ints_like_strtoul() {
        let p = |s| parse_int("request count", s, 1, MAX);
        assert_eq!(p("010"), Ok(8));
        assert_eq!(p("0x10"), Ok(16));
        assert_eq!(p(" +5"), Ok(5));
        for bad in ["", "0x", "5 ", "5k", "1.5", "abc"] {
            assert!(matches!(p(bad), Err(NumError::Invalid { .. })), "{bad}");
        }
        for range in ["0", "-0", "-1", "2147483648", "99999999999999999999999"] {
            assert!(matches!(p(range), Err(NumError::Range { .. })), "{range}");
        }
        assert_eq!(
            p("abc").unwrap_err().to_string(),
            "Invalid request count specified: 'abc'."
        );
        assert_eq!(
            p("0").unwrap_err().to_string(),
            "Invalid request count specified. Must be between 1 and 2147483647."
        );
    }

    #[test]
    fn sizes_like_qemu_strtosz() {
        let p = |s| parse_size("buffer size", s, 1, MAX);
        assert_eq!(p("010"), Ok(10));
        assert_eq!(p("0x10"), Ok(16));
        assert_eq!(p(" 4k"), Ok(4096));
        assert_eq!(p("+4K"), Ok(4096));
        assert_eq!(p("1b"), Ok(1));
        assert_eq!(p("1.5k"), Ok(1536));
        assert_eq!(p("1.5m"), Ok(1572864));
        for bad in ["", "0x10k", "1.5", "1.5b", "4kb", "1e3", "0x1.8k"] {
            assert!(matches!(p(bad), Err(NumError::Invalid { .. })), "{bad}");
        }
        for range in ["0", "-0", "3G", "7E", "8E", "99999999999999999999"] {
            assert!(matches!(p(range), Err(NumError::Range { .. })), "{range}");
        }
        let o = |s| parse_size("offset", s, 0, i64::MAX);
        assert_eq!(o("7E"), Ok(7 << 60));
        assert!(matches!(o("8E"), Err(NumError::Range { .. })));
    }
}
