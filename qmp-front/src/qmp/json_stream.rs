//! Streaming JSON reader for QMP input, mirroring QEMU's json-lexer,
//! json-streamer and json-parser.
//!
//! Bytes are fed incrementally ([`JsonStream::feed`]); every complete
//! top-level value (or error) comes out as a [`StreamItem`]. Runs on the
//! monitor's loop thread; holds no shared state.
//!
//! Behaviour taken from QEMU 10:
//! - Extensions: single-quoted strings, `\'` escape, modified UTF-8 (`\xC0\x80`).
//! - A lexical error is reported once ("JSON parse error, stray '...'"), the
//!   partial message is discarded and the lexer skips input until a
//!   structural character (`{ } [ ]`), an ASCII control character other than
//!   tab, or a `0xFE`/`0xFF` byte, then resumes.
//! - A message is handed to the parser as soon as its braces and brackets
//!   balance (or one goes negative).
//! - Limits: 1024 nesting levels, 64 MiB of token text, 2 Mi tokens per message.
//!
//! Deviation: a float literal outside `f64`'s range (QEMU yields `inf`) is
//! rejected with "JSON parse error, number out of range", because
//! `serde_json::Value` cannot hold infinities.

use serde_json::{Map, Number, Value};

/// Maximum total token text per message, as QEMU's `MAX_TOKEN_SIZE`.
pub const MAX_TOKEN_SIZE: usize = 64 << 20;
/// Maximum number of tokens per message, as QEMU's `MAX_TOKEN_COUNT`.
pub const MAX_TOKEN_COUNT: usize = 2 << 20;
/// Maximum nesting of `{`/`[`, as QEMU's `MAX_NESTING`.
pub const MAX_NESTING: usize = 1 << 10;

/// One output of the stream: a complete value or an error message.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// A complete top-level JSON value.
    Value(Value),
    /// A parse error; the text is QEMU's `desc` (e.g. "JSON parse error, expecting value").
    Error(JsonError),
}

/// A JSON parse error with QEMU's wording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Syntax or lexical error; the string follows "JSON parse error, ".
    #[error("JSON parse error, {0}")]
    Parse(String),
    /// A message exceeded [`MAX_TOKEN_SIZE`].
    #[error("JSON token size limit exceeded")]
    TokenSize,
    /// A message exceeded [`MAX_TOKEN_COUNT`].
    #[error("JSON token count limit exceeded")]
    TokenCount,
    /// A message exceeded [`MAX_NESTING`].
    #[error("JSON nesting depth limit exceeded")]
    Nesting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    Str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lx {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    NonZero,
    Neg,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpDigit,
    ExpDigits,
    Keyword,
}

/// Outcome of feeding one byte to the lexer state machine.
enum Step {
    /// Byte consumed, continue in the given state.
    Stay(Lx),
    /// Byte consumed and completes a token.
    Emit(Tok),
    /// Token complete before this byte; byte must be re-fed in `Start`.
    EmitLookahead(Tok),
    /// Whitespace consumed.
    Skip,
    /// Lexical error (byte consumed).
    Error,
    /// Leave recovery; re-feed the byte in `Start`.
    Resync,
}

fn step(state: Lx, b: u8) -> Step {
    use Step::*;
    match state {
        Lx::Start => match b {
            b'"' => Stay(Lx::DqString),
            b'\'' => Stay(Lx::SqString),
            b'0' => Stay(Lx::Zero),
            b'1'..=b'9' => Stay(Lx::NonZero),
            b'-' => Stay(Lx::Neg),
            b'{' => Emit(Tok::LCurly),
            b'}' => Emit(Tok::RCurly),
            b'[' => Emit(Tok::LSquare),
            b']' => Emit(Tok::RSquare),
            b',' => Emit(Tok::Comma),
            b':' => Emit(Tok::Colon),
            b'a'..=b'z' => Stay(Lx::Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Skip,
            _ => Error,
        },
        Lx::Recovery => match b {
            b'\t' => Stay(Lx::Recovery),
            0..=0x1f | 0xfe | 0xff | b'{' | b'}' | b'[' | b']' => Resync,
            _ => Stay(Lx::Recovery),
        },
        Lx::DqString | Lx::SqString => {
            let dq = state == Lx::DqString;
            match b {
                b'\\' => Stay(if dq { Lx::DqEscape } else { Lx::SqEscape }),
                b'"' if dq => Emit(Tok::Str),
                b'\'' if !dq => Emit(Tok::Str),
                0x20..=0xfd => Stay(state),
                _ => Error,
            }
        }
        Lx::DqEscape | Lx::SqEscape => match b {
            0x20..=0xfd => Stay(if state == Lx::DqEscape {
                Lx::DqString
            } else {
                Lx::SqString
            }),
            _ => Error,
        },
        Lx::Zero => match b {
            b'0'..=b'9' => Error,
            b'.' => Stay(Lx::Mantissa),
            _ => EmitLookahead(Tok::Integer),
        },
        Lx::NonZero => match b {
            b'0'..=b'9' => Stay(Lx::NonZero),
            b'e' | b'E' => Stay(Lx::ExpE),
            b'.' => Stay(Lx::Mantissa),
            _ => EmitLookahead(Tok::Integer),
        },
        Lx::Neg => match b {
            b'0' => Stay(Lx::Zero),
            b'1'..=b'9' => Stay(Lx::NonZero),
            _ => Error,
        },
        Lx::Mantissa => match b {
            b'0'..=b'9' => Stay(Lx::MantissaDigits),
            _ => Error,
        },
        Lx::MantissaDigits => match b {
            b'0'..=b'9' => Stay(Lx::MantissaDigits),
            b'e' | b'E' => Stay(Lx::ExpE),
            _ => EmitLookahead(Tok::Float),
        },
        Lx::ExpE => match b {
            b'+' | b'-' => Stay(Lx::ExpDigit),
            b'0'..=b'9' => Stay(Lx::ExpDigits),
            _ => Error,
        },
        Lx::ExpDigit => match b {
            b'0'..=b'9' => Stay(Lx::ExpDigits),
            _ => Error,
        },
        Lx::ExpDigits => match b {
            b'0'..=b'9' => Stay(Lx::ExpDigits),
            _ => EmitLookahead(Tok::Float),
        },
        Lx::Keyword => match b {
            b'a'..=b'z' => Stay(Lx::Keyword),
            _ => EmitLookahead(Tok::Keyword),
        },
    }
}

/// Incremental JSON message reader (lexer + streamer + parser).
#[derive(Debug)]
pub struct JsonStream {
    state: Lx,
    token: Vec<u8>,
    tokens: Vec<(Tok, Vec<u8>)>,
    token_size: usize,
    brace: i64,
    bracket: i64,
}

impl Default for JsonStream {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStream {
    /// A reader in its initial state.
    pub fn new() -> Self {
        JsonStream {
            state: Lx::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            token_size: 0,
            brace: 0,
            bracket: 0,
        }
    }

    /// Feed bytes; returns every message completed by them, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<StreamItem> {
        let mut out = Vec::new();
        for &b in bytes {
            self.feed_byte(b, &mut out);
        }
        out
    }

    /// Signal end of input: completes a pending number or keyword and
    /// reports an incomplete message, as QEMU's `json_message_parser_flush`.
    pub fn finish(&mut self) -> Vec<StreamItem> {
        let mut out = Vec::new();
        match self.state {
            Lx::Zero | Lx::NonZero => self.token_done(Tok::Integer, &mut out),
            Lx::MantissaDigits | Lx::ExpDigits => self.token_done(Tok::Float, &mut out),
            Lx::Keyword => self.token_done(Tok::Keyword, &mut out),
            Lx::Start | Lx::Recovery => {}
            _ => self.lex_error(&mut out),
        }
        self.state = Lx::Start;
        self.token.clear();
        if !self.tokens.is_empty() {
            let tokens = std::mem::take(&mut self.tokens);
            self.reset();
            out.push(match parse_tokens(&tokens) {
                Ok(v) => StreamItem::Value(v),
                Err(e) => StreamItem::Error(e),
            });
        }
        out
    }

    fn reset(&mut self) {
        self.tokens.clear();
        self.token_size = 0;
        self.brace = 0;
        self.bracket = 0;
    }

    fn lex_error(&mut self, out: &mut Vec<StreamItem>) {
        // QEMU prints the token as a C string: stop at the first NUL.
        let text = match self.token.iter().position(|&c| c == 0) {
            Some(n) => &self.token[..n],
            None => &self.token[..],
        };
        let msg = format!("stray '{}'", String::from_utf8_lossy(text));
        self.token.clear();
        self.reset();
        self.state = Lx::Recovery;
        out.push(StreamItem::Error(JsonError::Parse(msg)));
    }

    fn feed_byte(&mut self, b: u8, out: &mut Vec<StreamItem>) {
        loop {
            match step(self.state, b) {
                Step::Stay(s) => {
                    if s != Lx::Recovery {
                        self.token.push(b);
                    }
                    self.state = s;
                    if self.token.len() > MAX_TOKEN_SIZE {
                        self.token.clear();
                        self.reset();
                        self.state = Lx::Recovery;
                        out.push(StreamItem::Error(JsonError::TokenSize));
                    }
                    return;
                }
                Step::Skip => return,
                Step::Emit(t) => {
                    self.token.push(b);
                    self.token_done(t, out);
                    return;
                }
                Step::EmitLookahead(t) => {
                    self.token_done(t, out);
                    // re-feed b in Start
                }
                Step::Error => {
                    self.token.push(b);
                    self.lex_error(out);
                    return;
                }
                Step::Resync => self.state = Lx::Start,
            }
        }
    }

    fn token_done(&mut self, t: Tok, out: &mut Vec<StreamItem>) {
        let text = std::mem::take(&mut self.token);
        self.state = Lx::Start;
        match t {
            Tok::LCurly => self.brace += 1,
            Tok::RCurly => self.brace -= 1,
            Tok::LSquare => self.bracket += 1,
            Tok::RSquare => self.bracket -= 1,
            _ => {}
        }
        let err = if self.token_size + text.len() + 1 > MAX_TOKEN_SIZE {
            Some(JsonError::TokenSize)
        } else if self.tokens.len() + 1 > MAX_TOKEN_COUNT {
            Some(JsonError::TokenCount)
        } else if self.brace + self.bracket > MAX_NESTING as i64 {
            Some(JsonError::Nesting)
        } else {
            None
        };
        if let Some(e) = err {
            self.reset();
            out.push(StreamItem::Error(e));
            return;
        }
        self.token_size += text.len();
        self.tokens.push((t, text));
        if (self.brace > 0 || self.bracket > 0) && self.brace >= 0 && self.bracket >= 0 {
            return;
        }
        let tokens = std::mem::take(&mut self.tokens);
        self.reset();
        out.push(match parse_tokens(&tokens) {
            Ok(v) => StreamItem::Value(v),
            Err(e) => StreamItem::Error(e),
        });
    }
}

/// Parse one complete JSON text (QEMU's `qobject_from_json`): exactly one
/// value, QEMU's extensions and error texts.
pub fn parse_str(text: &str) -> Result<Value, JsonError> {
    let mut s = JsonStream::new();
    let mut items = s.feed(text.as_bytes());
    items.extend(s.finish());
    match items.into_iter().next() {
        Some(StreamItem::Value(v)) => Ok(v),
        Some(StreamItem::Error(e)) => Err(e),
        None => Err(JsonError::Parse("expecting value".into())),
    }
}

struct Parser<'a> {
    toks: &'a [(Tok, Vec<u8>)],
    pos: usize,
}

fn perr(msg: impl Into<String>) -> JsonError {
    JsonError::Parse(msg.into())
}

fn parse_tokens(toks: &[(Tok, Vec<u8>)]) -> Result<Value, JsonError> {
    let mut p = Parser { toks, pos: 0 };
    p.value()
}

impl Parser<'_> {
    fn next(&mut self) -> Option<&(Tok, Vec<u8>)> {
        let t = self.toks.get(self.pos);
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    fn peek(&self) -> Option<Tok> {
        self.toks.get(self.pos).map(|t| t.0)
    }

    fn value(&mut self) -> Result<Value, JsonError> {
        let Some((t, text)) = self.next() else {
            return Err(perr("expecting value"));
        };
        match t {
            Tok::LCurly => self.object(),
            Tok::LSquare => self.array(),
            Tok::Str => parse_string(text).map(Value::String),
            Tok::Integer => Ok(parse_integer(text)),
            Tok::Float => parse_float(text),
            Tok::Keyword => match text.as_slice() {
                b"true" => Ok(Value::Bool(true)),
                b"false" => Ok(Value::Bool(false)),
                b"null" => Ok(Value::Null),
                other => Err(perr(format!(
                    "invalid keyword '{}'",
                    String::from_utf8_lossy(other)
                ))),
            },
            _ => Err(perr("expecting value")),
        }
    }

    fn object(&mut self) -> Result<Value, JsonError> {
        let mut map = Map::new();
        if self.peek() == Some(Tok::RCurly) {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            let key = match self.value()? {
                Value::String(s) => s,
                _ => return Err(perr("key is not a string in object")),
            };
            match self.next() {
                Some((Tok::Colon, _)) => {}
                _ => return Err(perr("missing : in object pair")),
            }
            let v = self.value()?;
            if map.contains_key(&key) {
                return Err(perr("duplicate key"));
            }
            map.insert(key, v);
            match self.next() {
                Some((Tok::RCurly, _)) => return Ok(Value::Object(map)),
                Some((Tok::Comma, _)) => {}
                Some(_) => return Err(perr("expected separator in dict")),
                None => return Err(perr("premature EOI")),
            }
        }
    }

    fn array(&mut self) -> Result<Value, JsonError> {
        let mut list = Vec::new();
        if self.peek() == Some(Tok::RSquare) {
            self.pos += 1;
            return Ok(Value::Array(list));
        }
        loop {
            list.push(self.value()?);
            match self.next() {
                Some((Tok::RSquare, _)) => return Ok(Value::Array(list)),
                Some((Tok::Comma, _)) => {}
                Some(_) => return Err(perr("expected separator in list")),
                None => return Err(perr("premature EOI")),
            }
        }
    }
}

fn parse_integer(text: &[u8]) -> Value {
    let s = String::from_utf8_lossy(text);
    if let Ok(i) = s.parse::<i64>() {
        return Value::Number(i.into());
    }
    if let Ok(u) = s.parse::<u64>() {
        return Value::Number(u.into());
    }
    // Out of 64-bit range: QEMU falls back to a double.
    let f = s.parse::<f64>().unwrap_or(0.0);
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn parse_float(text: &[u8]) -> Result<Value, JsonError> {
    let s = String::from_utf8_lossy(text);
    let f = s.parse::<f64>().map_err(|_| perr("invalid number"))?;
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| perr("number out of range"))
}

/// QEMU's notion of a valid code point (`is_valid_codepoint`): no
/// surrogates, no noncharacters, at most U+10FFFF.
fn valid_codepoint(cp: u32) -> bool {
    cp <= 0x10ffff
        && !(0xd800..=0xdfff).contains(&cp)
        && !(0xfdd0..=0xfdef).contains(&cp)
        && (cp & 0xfffe) != 0xfffe
}

fn hex4(b: &[u8]) -> Option<u32> {
    if b.len() < 4 {
        return None;
    }
    let mut v = 0u32;
    for &c in &b[..4] {
        v = v * 16 + (c as char).to_digit(16)?;
    }
    Some(v)
}

/// Decode one modified-UTF-8 sequence; returns (code point, length).
fn mod_utf8(b: &[u8]) -> Option<(u32, usize)> {
    let c0 = *b.first()? as u32;
    let (len, min, init) = match c0 {
        0x00..=0x7f => return Some((c0, 1)),
        0xc0..=0xdf => (2, 0x80, c0 & 0x1f),
        0xe0..=0xef => (3, 0x800, c0 & 0x0f),
        0xf0..=0xf7 => (4, 0x10000, c0 & 0x07),
        _ => return None,
    };
    let mut cp = init;
    for i in 1..len {
        let c = *b.get(i)? as u32;
        if c & 0xc0 != 0x80 {
            return None;
        }
        cp = (cp << 6) | (c & 0x3f);
    }
    // Modified UTF-8 encodes U+0000 as C0 80; all other overlongs are invalid.
    if cp < min && !(len == 2 && cp == 0) {
        return None;
    }
    if !valid_codepoint(cp) {
        return None;
    }
    Some((cp, len))
}

fn parse_string(tok: &[u8]) -> Result<String, JsonError> {
    // Token includes its quotes.
    let body = &tok[1..tok.len().saturating_sub(1).max(1)];
    let mut out = String::new();
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        if c == b'\\' {
            let beg = i;
            let e = body.get(i + 1).copied().unwrap_or(0);
            i += 2;
            match e {
                b'"' => out.push('"'),
                b'\'' => out.push('\''),
                b'\\' => out.push('\\'),
                b'/' => out.push('/'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let mut cp = hex4(&body[i..]).map_or(-1i64, i64::from);
                    i += 4;
                    if (0xd800..=0xdbff).contains(&cp)
                        && body.get(i) == Some(&b'\\')
                        && body.get(i + 1) == Some(&b'u')
                    {
                        let lead = cp;
                        let trail = hex4(body.get(i + 2..).unwrap_or(&[])).map_or(-1i64, i64::from);
                        if (0xdc00..=0xdfff).contains(&trail) {
                            cp = 0x10000 + (((lead & 0x3ff) << 10) | (trail & 0x3ff));
                            i += 6;
                        } else {
                            cp = -1;
                        }
                    }
                    match u32::try_from(cp)
                        .ok()
                        .filter(|&c| valid_codepoint(c))
                        .and_then(char::from_u32)
                    {
                        Some(ch) => out.push(ch),
                        None => {
                            // QEMU prints the escape from the token, which
                            // still holds the closing quote.
                            let tok_beg = beg + 1;
                            let end = (tok_beg + (i - beg)).min(tok.len());
                            return Err(perr(format!(
                                "{} is not a valid Unicode character",
                                String::from_utf8_lossy(&tok[tok_beg..end])
                            )));
                        }
                    }
                }
                _ => return Err(perr("invalid escape sequence in string")),
            }
        } else {
            match mod_utf8(&body[i..]).and_then(|(cp, n)| char::from_u32(cp).map(|ch| (ch, n))) {
                Some((ch, n)) => {
                    out.push(ch);
                    i += n;
                }
                None => return Err(perr("invalid UTF-8 sequence in string")),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn items(input: &[u8]) -> Vec<Result<Value, String>> {
        let mut s = JsonStream::new();
        s.feed(input)
            .into_iter()
            .map(|i| match i {
                StreamItem::Value(v) => Ok(v),
                StreamItem::Error(e) => Err(e.to_string()),
            })
            .collect()
    }

    fn err(s: &str) -> Result<Value, String> {
        Err(s.to_string())
    }

    #[test]
    fn values_and_incremental_feed() {
        let mut s = JsonStream::new();
        assert!(s.feed(b"{\"execute\": ").is_empty());
        assert!(s.feed(b"\"x\", \"id\": [1, ").is_empty());
        let out = s.feed(b"2]}{}");
        assert_eq!(
            out,
            vec![
                StreamItem::Value(json!({"execute": "x", "id": [1, 2]})),
                StreamItem::Value(json!({}))
            ]
        );
        // A number needs a following byte to be complete.
        assert!(s.feed(b"12").is_empty());
        assert_eq!(s.feed(b" "), vec![StreamItem::Value(json!(12))]);
    }

    #[test]
    fn numbers_keep_qemu_types() {
        assert_eq!(parse_str("18446744073709551615").unwrap(), json!(u64::MAX));
        assert_eq!(parse_str("-9223372036854775808").unwrap(), json!(i64::MIN));
        assert!(parse_str("-9223372036854775809").unwrap().is_f64());
        assert!(parse_str("18446744073709551616").unwrap().is_f64());
        assert!(parse_str("1e3").unwrap().is_f64());
        assert!(parse_str("1.0").unwrap().is_f64());
        assert_eq!(parse_str("-0").unwrap(), json!(0));
        assert!(parse_str("1e400").is_err());
    }

    #[test]
    fn strings() {
        assert_eq!(parse_str("'a\"b'").unwrap(), json!("a\"b"));
        assert_eq!(
            parse_str(r#""\/\b\f\n\r\t\u0001\u007f\'""#).unwrap(),
            json!("/\u{8}\u{c}\n\r\t\u{1}\u{7f}'")
        );
        assert_eq!(parse_str(r#""\ud83d\ude00""#).unwrap(), json!("\u{1f600}"));
        assert_eq!(parse_str("\"\\u0000x\"").unwrap(), json!("\u{0}x"));
        assert_eq!(parse_str("\"\u{e9}\"").unwrap(), json!("\u{e9}"));
        let mut s = JsonStream::new();
        assert_eq!(
            s.feed(b"\"\xc0\x80\""),
            vec![StreamItem::Value(json!("\u{0}"))]
        );
    }

    /// Expected texts taken from qemu-storage-daemon 10.0.
    #[test]
    fn qemu_error_texts() {
        let cases: &[(&[u8], &[&str])] = &[
            (
                b"{\"a\" 1}",
                &["JSON parse error, missing : in object pair"],
            ),
            (
                b"{1:2}",
                &["JSON parse error, key is not a string in object"],
            ),
            (
                b"{\"a\":1 \"b\":2}",
                &["JSON parse error, expected separator in dict"],
            ),
            (b"[1 2]", &["JSON parse error, expected separator in list"]),
            (b"[1,]", &["JSON parse error, expecting value"]),
            (b"{\"a\":1,}", &["JSON parse error, expecting value"]),
            (b"{,}", &["JSON parse error, expecting value"]),
            (b"@", &["JSON parse error, stray '@'"]),
            (
                b"{\"a\": @ 1}\n",
                &[
                    "JSON parse error, stray '@'",
                    "JSON parse error, expecting value",
                ],
            ),
            (
                b"{\"x\":\"\x01\"}",
                &[
                    "JSON parse error, stray '\"\u{1}'",
                    "JSON parse error, expecting value",
                ],
            ),
            (
                b"\"\\q\"",
                &["JSON parse error, invalid escape sequence in string"],
            ),
            (
                b"\"\\u12\"",
                &["JSON parse error, \\u12\" is not a valid Unicode character"],
            ),
            (
                b"\"\\ud800\"",
                &["JSON parse error, \\ud800 is not a valid Unicode character"],
            ),
            (
                b"\"\\uffff\"",
                &["JSON parse error, \\uffff is not a valid Unicode character"],
            ),
            (
                b"\"\\ufdd0\"",
                &["JSON parse error, \\ufdd0 is not a valid Unicode character"],
            ),
            (
                b"\"\xc3\"",
                &["JSON parse error, invalid UTF-8 sequence in string"],
            ),
            (
                b"\"\xed\xa0\x80\"",
                &["JSON parse error, invalid UTF-8 sequence in string"],
            ),
            (
                b"\"\xef\xbf\xbf\"",
                &["JSON parse error, invalid UTF-8 sequence in string"],
            ),
            (
                b"\"\xf4\x90\x80\x80\"",
                &["JSON parse error, invalid UTF-8 sequence in string"],
            ),
            (b"01", &["JSON parse error, stray '01'"]),
            (b"1.\n", &["JSON parse error, stray '1.\n'"]),
            (b"-\n", &["JSON parse error, stray '-\n'"]),
            (b".5", &["JSON parse error, stray '.'"]),
            (b"%d", &["JSON parse error, stray '%'"]),
            (b"TRUE", &["JSON parse error, stray 'T'"]),
            (b"truex\n", &["JSON parse error, invalid keyword 'truex'"]),
            (b"\xff", &["JSON parse error, stray '\u{fffd}'"]),
            (b"\x00", &["JSON parse error, stray ''"]),
            (
                b"garbage\n",
                &["JSON parse error, invalid keyword 'garbage'"],
            ),
            (b"]", &["JSON parse error, expecting value"]),
            (b"[1}", &["JSON parse error, expected separator in list"]),
            (
                b"{\"execute\":\"a\",\"execute\":\"b\"}",
                &["JSON parse error, duplicate key"],
            ),
        ];
        for (input, want) in cases {
            let got = items(input);
            let want: Vec<_> = want.iter().map(|w| err(w)).collect();
            assert_eq!(got, want, "input {:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn recovers_after_error() {
        let got = items(b"{\"a\": tru@e}\n{\"b\": 1}");
        assert_eq!(
            got,
            vec![
                err("JSON parse error, stray '@'"),
                err("JSON parse error, expecting value"),
                Ok(json!({"b": 1}))
            ]
        );
        // Recovery skips up to the next structural character.
        assert_eq!(
            items(b"@ junk {}"),
            vec![err("JSON parse error, stray '@'"), Ok(json!({}))]
        );
    }

    #[test]
    fn nesting_limit() {
        let mut deep = vec![b'['; MAX_NESTING];
        deep.extend(vec![b']'; MAX_NESTING]);
        assert_eq!(items(&deep).len(), 1);
        assert!(items(&deep)[0].is_ok());
        // Taken from qemu-storage-daemon 10.0: one limit error, then every
        // stray ']' is "expecting value".
        let mut over = vec![b'['; MAX_NESTING + 1];
        over.extend(vec![b']'; MAX_NESTING + 1]);
        let got = items(&over);
        assert_eq!(got.len(), MAX_NESTING + 2);
        assert_eq!(got[0], err("JSON nesting depth limit exceeded"));
        assert_eq!(got[1], err("JSON parse error, expecting value"));
    }

    #[test]
    fn finish_flushes() {
        let mut s = JsonStream::new();
        assert!(s.feed(b"42").is_empty());
        assert_eq!(s.finish(), vec![StreamItem::Value(json!(42))]);
        assert!(s.feed(b"[1").is_empty());
        assert_eq!(s.finish().len(), 1);
    }
}
