//! NBD wire constants and encodings (the NBD protocol document; QEMU's
//! `docs/interop/nbd.txt` adds the `qemu:` metadata contexts).
//!
//! Everything on the wire is big-endian. This module only encodes and
//! decodes; it owns no state.

/// "NBDMAGIC", first word of the handshake.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle option magic (server greeting and each option).
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of option replies.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags we understand.
pub const CLIENT_FLAGS: u32 = 0b11;

/// Options.
pub mod opt {
    /// Legacy export selection; ends negotiation.
    pub const EXPORT_NAME: u32 = 1;
    /// Client gives up.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// TLS upgrade.
    pub const STARTTLS: u32 = 5;
    /// Export information.
    pub const INFO: u32 = 6;
    /// Export information, then transmission.
    pub const GO: u32 = 7;
    /// Structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// 64-bit request and reply headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Success, end of this option's replies.
    pub const ACK: u32 = 1;
    /// One export in a LIST reply.
    pub const SERVER: u32 = 2;
    /// One info item.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Error bit.
    pub const ERR: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// Malformed option.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// TLS required first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// Unknown export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// Option data too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// Info types of INFO/GO.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Export name.
    pub const NAME: u16 = 1;
    /// Description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    /// Flags are valid.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The DF (don't fragment) flag is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see each other's flushed writes.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// FAST_ZERO is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Request magic (compact header).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Request magic (extended header).
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended reply magic.
pub const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim (discard).
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES must not punch holes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ must not be fragmented.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail fast if slow.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the length field is a payload length.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types.
pub mod chunk {
    /// No payload (final chunk).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole (reads as zeros).
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status extents (32-bit).
    pub const BLOCK_STATUS: u16 = 5;
    /// Block status extents (64-bit, extended headers).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// An error.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// Reply flag: last chunk.
    pub const FLAG_DONE: u16 = 1;
}

/// NBD error numbers (not host errnos).
pub mod err {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Maps a host errno to the NBD error set (anything else is EIO, as in QEMU).
pub fn errno_to_nbd(e: i32) -> u32 {
    match e {
        libc::EPERM | libc::EROFS => err::EPERM,
        libc::ENOMEM => err::ENOMEM,
        libc::EINVAL => err::EINVAL,
        libc::EFBIG | libc::ENOSPC => err::ENOSPC,
        libc::EOVERFLOW => err::EOVERFLOW,
        libc::ENOTSUP => err::ENOTSUP,
        libc::ESHUTDOWN => err::ESHUTDOWN,
        _ => err::EIO,
    }
}

/// base:allocation flag: a hole.
pub const STATE_HOLE: u32 = 1;
/// base:allocation flag: reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// qemu:dirty-bitmap flag: written since the bitmap was last cleared.
pub const STATE_DIRTY: u32 = 1;

/// Largest string (export name, context name) accepted, as QEMU.
pub const MAX_STRING: usize = 4096;
/// Largest payload of one request (QEMU's NBD_MAX_BUFFER_SIZE).
pub const MAX_BUFFER: u64 = 32 << 20;
/// Largest option payload accepted before the client is dropped.
pub const MAX_OPTION: u32 = 64 << 10;

/// A decoded transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub ty: u16,
    /// Client cookie (handle), echoed in replies.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length (or payload length with PAYLOAD_LEN).
    pub len: u64,
}

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXT_REQUEST_LEN: usize = 32;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Decodes a request header; `None` on a bad magic. `hdr` has the size of
/// the negotiated header kind.
pub fn decode_request(hdr: &[u8], extended: bool) -> Option<Request> {
    let magic = be32(hdr);
    let want = if extended {
        EXT_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return None;
    }
    Some(Request {
        flags: be16(&hdr[4..]),
        ty: be16(&hdr[6..]),
        cookie: be64(&hdr[8..]),
        offset: be64(&hdr[16..]),
        len: if extended {
            be64(&hdr[24..])
        } else {
            u64::from(be32(&hdr[24..]))
        },
    })
}

/// Encodes a simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encodes a structured (or, with `extended`, an extended) reply chunk
/// header; `offset` is only on the wire with extended headers.
pub fn chunk_header(
    extended: bool,
    flags: u16,
    ty: u16,
    cookie: u64,
    offset: u64,
    payload: u64,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    if extended {
        b.extend_from_slice(&EXT_REPLY_MAGIC.to_be_bytes());
    } else {
        b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    }
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&ty.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    if extended {
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&payload.to_be_bytes());
    } else {
        b.extend_from_slice(&(payload as u32).to_be_bytes());
    }
    b
}

/// Encodes an option reply header (+ payload).
pub fn option_reply(option: u32, ty: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&REP_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&ty.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let mut h = Vec::new();
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&1u16.to_be_bytes());
        h.extend_from_slice(&cmd::WRITE.to_be_bytes());
        h.extend_from_slice(&42u64.to_be_bytes());
        h.extend_from_slice(&4096u64.to_be_bytes());
        h.extend_from_slice(&512u32.to_be_bytes());
        let r = decode_request(&h, false).unwrap();
        assert_eq!(
            r,
            Request {
                flags: 1,
                ty: cmd::WRITE,
                cookie: 42,
                offset: 4096,
                len: 512
            }
        );
        assert!(decode_request(&h, true).is_none());
        h[0] ^= 1;
        assert!(decode_request(&h, false).is_none());
    }

    #[test]
    fn reply_layouts() {
        assert_eq!(simple_reply(5, 7)[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(chunk_header(false, 1, chunk::NONE, 3, 0, 0).len(), 20);
        assert_eq!(chunk_header(true, 1, chunk::NONE, 3, 0, 0).len(), 32);
        assert_eq!(option_reply(opt::GO, rep::ACK, &[]).len(), 20);
        assert_eq!(errno_to_nbd(libc::ENOSPC), err::ENOSPC);
        assert_eq!(errno_to_nbd(libc::EBADF), err::EIO);
    }
}
