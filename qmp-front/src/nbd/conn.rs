//! One NBD client connection: fixed-newstyle negotiation, then the
//! transmission phase with requests served concurrently.
//!
//! The reading side is one loop (this task): it parses request headers,
//! reads write payloads, and spawns a task per request, up to
//! [`MAX_IN_FLIGHT`] at once. Replies may complete in any order; each is
//! written whole under the connection's write lock so replies never
//! interleave on the wire. A protocol violation that leaves the stream out
//! of sync (bad magic, oversized write payload) drops the client; anything
//! else is answered with an NBD error and the connection goes on.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

use block_core::{Error, IoBuf, Result as BlockResult, WriteFlags};

use super::proto::{self, cflag, chunk, cmd, info, opt, rep, tflag, Request};
use super::server::{NbdExport, NbdServer};
use super::socket::Socket;

/// Requests served at once per connection.
pub const MAX_IN_FLIGHT: usize = 64;
/// Most extents in one BLOCK_STATUS reply (bounds reply size).
const MAX_EXTENTS: usize = 65536;
/// Context id of `base:allocation`.
const CTX_BASE_ALLOCATION: u32 = 1;
/// Context id of `qemu:allocation-depth`.
const CTX_ALLOCATION_DEPTH: u32 = 2;
/// Context id of the export's first `qemu:dirty-bitmap:NAME`; the others
/// follow in the export's order.
const CTX_DIRTY_BITMAP: u32 = 3;
/// The name prefix of dirty bitmap contexts.
const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// The shared part of a connection: the socket and its write lock; the
/// server and exports hold it weakly to disconnect clients.
pub struct ConnHandle {
    sock: Rc<Socket>,
    writing: Cell<bool>,
    write_waiters: RefCell<VecDeque<Waker>>,
    closed: Cell<bool>,
}

impl ConnHandle {
    pub(crate) fn new(sock: Rc<Socket>) -> Self {
        ConnHandle {
            sock,
            writing: Cell::new(false),
            write_waiters: RefCell::new(VecDeque::new()),
            closed: Cell::new(false),
        }
    }

    /// Disconnects the client (hard export removal, server stop).
    pub fn close(&self) {
        self.closed.set(true);
        self.sock.shutdown();
    }

    /// Writes one reply atomically with respect to other replies.
    async fn send(&self, parts: &[&[u8]]) -> std::io::Result<()> {
        poll_fn(|cx| {
            if self.writing.get() {
                self.write_waiters
                    .borrow_mut()
                    .push_back(cx.waker().clone());
                Poll::Pending
            } else {
                self.writing.set(true);
                Poll::Ready(())
            }
        })
        .await;
        let r = self.sock.write_all(parts).await;
        self.writing.set(false);
        if let Some(w) = self.write_waiters.borrow_mut().pop_front() {
            w.wake();
        }
        r
    }
}

/// Buffered reading from the socket.
struct Reader {
    sock: Rc<Socket>,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

impl Reader {
    fn new(sock: Rc<Socket>) -> Self {
        Reader {
            sock,
            buf: vec![0; 256 << 10],
            pos: 0,
            end: 0,
        }
    }

    async fn read_exact(&mut self, out: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0;
        while done < out.len() {
            if self.pos == self.end {
                // Large payloads go straight to the destination.
                if out.len() - done >= self.buf.len() {
                    let n = self.sock.read_some(&mut out[done..]).await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    done += n;
                    continue;
                }
                self.pos = 0;
                self.end = self.sock.read_some(&mut self.buf).await?;
                if self.end == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            let n = (self.end - self.pos).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            done += n;
        }
        Ok(())
    }

    async fn u32(&mut self) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b).await?;
        Ok(u32::from_be_bytes(b))
    }
    async fn u64(&mut self) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b).await?;
        Ok(u64::from_be_bytes(b))
    }
}

/// What negotiation settled.
struct Negotiated {
    export: Rc<NbdExport>,
    structured: bool,
    extended: bool,
    contexts: Vec<u32>,
    /// Old-style EXPORT_NAME: no structured replies ever.
    _legacy: bool,
}

/// Serves one client until it disconnects or is dropped.
pub(crate) async fn serve(server: Rc<NbdServer>, conn: Rc<ConnHandle>) {
    let mut rd = Reader::new(Rc::clone(&conn.sock));
    let neg = match negotiate(&server, &conn, &mut rd).await {
        Ok(Some(n)) => n,
        _ => {
            conn.sock.shutdown();
            return;
        }
    };
    neg.export
        .conns
        .borrow_mut()
        .retain(|c| c.strong_count() > 0);
    neg.export.conns.borrow_mut().push(Rc::downgrade(&conn));
    transmission(&server, &conn, &mut rd, Rc::new(neg)).await;
    conn.sock.shutdown();
}

/// Transmission flags as QEMU's server sets them: write-type commands only
/// on writable exports, and no multi-conn when the server admits a single
/// client (`max-connections=1`).
fn tflags(exp: &NbdExport, structured: bool, single_client: bool) -> u16 {
    let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::SEND_CACHE;
    if !single_client {
        // Flush goes to the node, which all connections share: a flush on
        // any connection makes every connection's completed writes stable.
        f |= tflag::CAN_MULTI_CONN;
    }
    if structured {
        f |= tflag::SEND_DF;
    }
    if exp.cfg.writable {
        f |= tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO | tflag::SEND_TRIM;
    } else {
        f |= tflag::READ_ONLY;
    }
    f
}

async fn send_rep(conn: &ConnHandle, option: u32, ty: u32, payload: &[u8]) -> std::io::Result<()> {
    conn.send(&[&proto::option_reply(option, ty, payload)])
        .await
}

async fn send_err(conn: &ConnHandle, option: u32, ty: u32, msg: &str) -> std::io::Result<()> {
    send_rep(conn, option, ty, msg.as_bytes()).await
}

/// Parses a length-prefixed string from option data.
fn take_str(data: &[u8], pos: &mut usize, len_bytes: usize) -> Option<String> {
    let len = match len_bytes {
        4 => u32::from_be_bytes(data.get(*pos..*pos + 4)?.try_into().ok()?) as usize,
        _ => u16::from_be_bytes(data.get(*pos..*pos + 2)?.try_into().ok()?) as usize,
    };
    *pos += len_bytes;
    if len > proto::MAX_STRING {
        return None;
    }
    let s = data.get(*pos..*pos + len)?;
    *pos += len;
    String::from_utf8(s.to_vec()).ok()
}

async fn negotiate(
    server: &NbdServer,
    conn: &ConnHandle,
    rd: &mut Reader,
) -> std::io::Result<Option<Negotiated>> {
    let mut greet = Vec::with_capacity(18);
    greet.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greet.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    conn.send(&[&greet]).await?;
    let cflags = rd.u32().await?;
    if cflags & !proto::CLIENT_FLAGS != 0 || cflags & 1 == 0 {
        // Unknown client flags, or a client that is not fixed-newstyle.
        return Ok(None);
    }
    let no_zeroes = cflags & 2 != 0;
    let mut structured = false;
    let mut extended = false;
    let mut contexts: Vec<u32> = Vec::new();
    loop {
        if rd.u64().await? != proto::IHAVEOPT {
            return Ok(None);
        }
        let option = rd.u32().await?;
        let len = rd.u32().await?;
        if len > proto::MAX_OPTION {
            // Too large to even skip safely: drop the client, like QEMU.
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(exp) = server.export_named(&name) else {
                    return Ok(None);
                };
                let mut b = Vec::with_capacity(10 + 124);
                b.extend_from_slice(&exp.blk.size().to_be_bytes());
                b.extend_from_slice(
                    &tflags(&exp, structured, server.max_connections == 1).to_be_bytes(),
                );
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                conn.send(&[&b]).await?;
                return Ok(Some(Negotiated {
                    export: exp,
                    structured,
                    extended,
                    contexts,
                    _legacy: true,
                }));
            }
            opt::ABORT => {
                let _ = send_rep(conn, option, rep::ACK, &[]).await;
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    send_err(conn, option, rep::ERR_INVALID, "no payload expected").await?;
                    continue;
                }
                for e in server.exports() {
                    let mut p = Vec::new();
                    p.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    p.extend_from_slice(e.name.as_bytes());
                    if let Some(d) = &e.cfg.description {
                        p.extend_from_slice(d.as_bytes());
                    }
                    send_rep(conn, option, rep::SERVER, &p).await?;
                }
                send_rep(conn, option, rep::ACK, &[]).await?;
            }
            opt::STARTTLS => {
                send_err(conn, option, rep::ERR_POLICY, "TLS not configured").await?;
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_err(conn, option, rep::ERR_INVALID, "no payload expected").await?;
                } else if extended {
                    send_err(
                        conn,
                        option,
                        rep::ERR_INVALID,
                        "extended headers already negotiated",
                    )
                    .await?;
                } else if structured {
                    send_err(
                        conn,
                        option,
                        rep::ERR_INVALID,
                        "structured reply already negotiated",
                    )
                    .await?;
                } else {
                    structured = true;
                    send_rep(conn, option, rep::ACK, &[]).await?;
                }
            }
            opt::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    send_err(conn, option, rep::ERR_INVALID, "no payload expected").await?;
                } else if extended {
                    send_err(
                        conn,
                        option,
                        rep::ERR_INVALID,
                        "extended headers already negotiated",
                    )
                    .await?;
                } else {
                    extended = true;
                    structured = true;
                    send_rep(conn, option, rep::ACK, &[]).await?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                if !structured {
                    send_err(
                        conn,
                        option,
                        rep::ERR_INVALID,
                        "request requires structured replies",
                    )
                    .await?;
                    continue;
                }
                match parse_meta(&data) {
                    None => {
                        send_err(
                            conn,
                            option,
                            rep::ERR_INVALID,
                            "invalid meta context request",
                        )
                        .await?;
                    }
                    Some((name, queries)) => {
                        let Some(exp) = server.export_named(&name) else {
                            send_err(
                                conn,
                                option,
                                rep::ERR_UNKNOWN,
                                &format!("export '{name}' not present"),
                            )
                            .await?;
                            continue;
                        };
                        let list = option == opt::LIST_META_CONTEXT;
                        let chosen = match_contexts(&exp, &queries, list);
                        for (id, cname) in &chosen {
                            let mut p = id.to_be_bytes().to_vec();
                            p.extend_from_slice(cname.as_bytes());
                            send_rep(conn, option, rep::META_CONTEXT, &p).await?;
                        }
                        if !list {
                            contexts = chosen.iter().map(|(id, _)| *id).collect();
                        }
                        send_rep(conn, option, rep::ACK, &[]).await?;
                    }
                }
            }
            opt::INFO | opt::GO => {
                let mut pos = 0;
                let parsed = take_str(&data, &mut pos, 4).and_then(|name| {
                    let n = u16::from_be_bytes(data.get(pos..pos + 2)?.try_into().ok()?) as usize;
                    pos += 2;
                    let mut reqs = Vec::with_capacity(n);
                    for _ in 0..n {
                        reqs.push(u16::from_be_bytes(data.get(pos..pos + 2)?.try_into().ok()?));
                        pos += 2;
                    }
                    (pos == data.len()).then_some((name, reqs))
                });
                let Some((name, reqs)) = parsed else {
                    send_err(conn, option, rep::ERR_INVALID, "malformed info request").await?;
                    continue;
                };
                let Some(exp) = server.export_named(&name) else {
                    send_err(
                        conn,
                        option,
                        rep::ERR_UNKNOWN,
                        &format!("export '{name}' not present"),
                    )
                    .await?;
                    continue;
                };
                for r in &reqs {
                    match *r {
                        info::NAME => {
                            let mut p = info::NAME.to_be_bytes().to_vec();
                            p.extend_from_slice(exp.name.as_bytes());
                            send_rep(conn, option, rep::INFO, &p).await?;
                        }
                        info::DESCRIPTION => {
                            if let Some(d) = &exp.cfg.description {
                                let mut p = info::DESCRIPTION.to_be_bytes().to_vec();
                                p.extend_from_slice(d.as_bytes());
                                send_rep(conn, option, rep::INFO, &p).await?;
                            }
                        }
                        _ => {}
                    }
                }
                let align = exp.node.limits().request_alignment.max(1);
                let mut p = info::BLOCK_SIZE.to_be_bytes().to_vec();
                p.extend_from_slice(&align.to_be_bytes());
                p.extend_from_slice(&align.max(4096).to_be_bytes());
                p.extend_from_slice(&(proto::MAX_BUFFER as u32).to_be_bytes());
                send_rep(conn, option, rep::INFO, &p).await?;
                let mut p = info::EXPORT.to_be_bytes().to_vec();
                p.extend_from_slice(&exp.blk.size().to_be_bytes());
                p.extend_from_slice(
                    &tflags(&exp, structured, server.max_connections == 1).to_be_bytes(),
                );
                send_rep(conn, option, rep::INFO, &p).await?;
                send_rep(conn, option, rep::ACK, &[]).await?;
                if option == opt::GO {
                    return Ok(Some(Negotiated {
                        export: exp,
                        structured,
                        extended,
                        contexts,
                        _legacy: false,
                    }));
                }
            }
            _ => {
                send_err(conn, option, rep::ERR_UNSUP, "option not supported").await?;
            }
        }
    }
}

fn parse_meta(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut pos = 0;
    let name = take_str(data, &mut pos, 4)?;
    let n = u32::from_be_bytes(data.get(pos..pos + 4)?.try_into().ok()?) as usize;
    pos += 4;
    if n > 1024 {
        return None;
    }
    let mut q = Vec::with_capacity(n);
    for _ in 0..n {
        q.push(take_str(data, &mut pos, 4)?);
    }
    (pos == data.len()).then_some((name, q))
}

/// The contexts an export offers that match `queries` (all of them for an
/// empty LIST; none for an empty SET).
fn match_contexts(exp: &NbdExport, queries: &[String], list: bool) -> Vec<(u32, String)> {
    let mut offered = vec![(CTX_BASE_ALLOCATION, "base:allocation".to_owned())];
    if exp.cfg.allocation_depth {
        offered.push((CTX_ALLOCATION_DEPTH, "qemu:allocation-depth".to_owned()));
    }
    for (i, b) in exp.bitmaps.iter().enumerate() {
        offered.push((
            CTX_DIRTY_BITMAP + i as u32,
            format!("{DIRTY_BITMAP_PREFIX}{}", b.name()),
        ));
    }
    if queries.is_empty() {
        return if list { offered } else { Vec::new() };
    }
    // A bare namespace ("base:", "qemu:", "qemu:dirty-bitmap:") lists
    // what it holds but selects nothing, as in QEMU. A name that two
    // exported bitmaps share selects the first.
    let wanted = |i: usize, name: &str| {
        queries.iter().any(|q| {
            (q == name && offered.iter().position(|(_, n)| n == q) == Some(i))
                || (list
                    && ["base:", "qemu:", DIRTY_BITMAP_PREFIX]
                        .iter()
                        .any(|ns| q == ns && name.starts_with(ns)))
        })
    };
    offered
        .iter()
        .enumerate()
        .filter(|(i, (_, name))| wanted(*i, name))
        .map(|(_, c)| c.clone())
        .collect()
}

async fn transmission(
    server: &NbdServer,
    conn: &Rc<ConnHandle>,
    rd: &mut Reader,
    neg: Rc<Negotiated>,
) {
    let hdr_len = if neg.extended {
        proto::EXT_REQUEST_LEN
    } else {
        proto::REQUEST_LEN
    };
    let in_flight = Rc::new(InFlight::default());
    let mut hdr = [0u8; proto::EXT_REQUEST_LEN];
    loop {
        if conn.closed.get() || neg.export.is_removed() {
            break;
        }
        if rd.read_exact(&mut hdr[..hdr_len]).await.is_err() {
            break;
        }
        let Some(req) = proto::decode_request(&hdr[..hdr_len], neg.extended) else {
            break;
        };
        let mut payload = None;
        if req.ty == cmd::WRITE {
            if req.len > proto::MAX_BUFFER {
                // The payload cannot be skipped safely: drop the client.
                let _ =
                    reply_error(conn, &neg, &req, proto::err::EOVERFLOW, "request too large").await;
                break;
            }
            let mut buf = IoBuf::for_read(req.len as usize);
            if rd.read_exact(&mut buf).await.is_err() {
                break;
            }
            payload = Some(buf);
        } else if neg.extended && req.flags & cflag::PAYLOAD_LEN != 0 {
            // A payload we do not expect (only BLOCK_STATUS filters use it).
            let _ = reply_error(conn, &neg, &req, proto::err::EINVAL, "unexpected payload").await;
            break;
        }
        if req.ty == cmd::DISC {
            break;
        }
        in_flight.wait_below(MAX_IN_FLIGHT).await;
        in_flight.inc();
        let (c, n, f) = (Rc::clone(conn), Rc::clone(&neg), Rc::clone(&in_flight));
        server.ctx.spawn_detached(async move {
            if handle(&c, &n, req, payload).await.is_err() {
                c.close();
            }
            f.dec();
        });
    }
    in_flight.wait_below(1).await;
}

/// Count of requests in flight with a waiter for "below N".
#[derive(Default)]
struct InFlight {
    n: Cell<usize>,
    waiters: RefCell<Vec<Waker>>,
}

impl InFlight {
    fn inc(&self) {
        self.n.set(self.n.get() + 1);
    }
    fn dec(&self) {
        self.n.set(self.n.get() - 1);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
    async fn wait_below(&self, limit: usize) {
        poll_fn(|cx| {
            if self.n.get() < limit {
                Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

fn errno_of(e: &Error) -> u32 {
    proto::errno_to_nbd(e.errno().unwrap_or(libc::EIO))
}

async fn reply_ok(conn: &ConnHandle, neg: &Negotiated, req: &Request) -> std::io::Result<()> {
    if neg.extended {
        let h = proto::chunk_header(
            true,
            chunk::FLAG_DONE,
            chunk::NONE,
            req.cookie,
            req.offset,
            0,
        );
        conn.send(&[&h]).await
    } else {
        conn.send(&[&proto::simple_reply(0, req.cookie)]).await
    }
}

async fn reply_error(
    conn: &ConnHandle,
    neg: &Negotiated,
    req: &Request,
    err: u32,
    msg: &str,
) -> std::io::Result<()> {
    if neg.structured {
        let msg = &msg.as_bytes()[..msg.len().min(4096)];
        let mut p = err.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg);
        let h = proto::chunk_header(
            neg.extended,
            chunk::FLAG_DONE,
            chunk::ERROR,
            req.cookie,
            req.offset,
            p.len() as u64,
        );
        conn.send(&[&h, &p]).await
    } else {
        conn.send(&[&proto::simple_reply(err, req.cookie)]).await
    }
}

async fn reply_result(
    conn: &ConnHandle,
    neg: &Negotiated,
    req: &Request,
    r: BlockResult<()>,
) -> std::io::Result<()> {
    match r {
        Ok(()) => reply_ok(conn, neg, req).await,
        Err(e) => reply_error(conn, neg, req, errno_of(&e), &e.to_string()).await,
    }
}

/// Serves one request; an `Err` means the socket failed (drop the client).
async fn handle(
    conn: &ConnHandle,
    neg: &Negotiated,
    req: Request,
    payload: Option<IoBuf>,
) -> std::io::Result<()> {
    let exp = &neg.export;
    let size = exp.blk.size();
    let known = [
        cmd::READ,
        cmd::WRITE,
        cmd::FLUSH,
        cmd::TRIM,
        cmd::CACHE,
        cmd::WRITE_ZEROES,
        cmd::BLOCK_STATUS,
    ];
    if !known.contains(&req.ty) {
        return reply_error(conn, neg, &req, proto::err::EINVAL, "unsupported command").await;
    }
    let in_range = req.offset.checked_add(req.len).is_some_and(|e| e <= size);
    if req.ty != cmd::FLUSH && !in_range {
        return reply_error(
            conn,
            neg,
            &req,
            proto::err::EINVAL,
            "request beyond the end of the export",
        )
        .await;
    }
    let writes = matches!(req.ty, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && !exp.cfg.writable {
        return reply_error(conn, neg, &req, proto::err::EPERM, "export is read-only").await;
    }
    let fua = req.flags & cflag::FUA != 0 || exp.cfg.writethrough;
    match req.ty {
        cmd::READ => {
            if req.len > proto::MAX_BUFFER {
                return reply_error(conn, neg, &req, proto::err::EINVAL, "read too large").await;
            }
            if neg.structured && req.flags & cflag::DF == 0 && req.len > 0 {
                return sparse_read(conn, neg, &req).await;
            }
            match exp
                .blk
                .pread(req.offset, IoBuf::for_read(req.len as usize))
                .await
            {
                Ok(buf) => {
                    if neg.structured {
                        let h = proto::chunk_header(
                            neg.extended,
                            chunk::FLAG_DONE,
                            chunk::OFFSET_DATA,
                            req.cookie,
                            req.offset,
                            8 + req.len,
                        );
                        conn.send(&[&h, &req.offset.to_be_bytes(), &buf]).await
                    } else {
                        conn.send(&[&proto::simple_reply(0, req.cookie), &buf])
                            .await
                    }
                }
                Err(e) => reply_error(conn, neg, &req, errno_of(&e), &e.to_string()).await,
            }
        }
        cmd::WRITE => {
            let buf = payload.unwrap_or_else(|| IoBuf::zeroed(0));
            let r = exp
                .blk
                .pwrite(
                    req.offset,
                    buf,
                    WriteFlags {
                        fua,
                        ..Default::default()
                    },
                )
                .await
                .map(|_| ());
            reply_result(conn, neg, &req, r).await
        }
        cmd::WRITE_ZEROES => {
            let flags = WriteFlags {
                fua,
                may_unmap: req.flags & cflag::NO_HOLE == 0,
                no_fallback: req.flags & cflag::FAST_ZERO != 0,
            };
            let r = exp.blk.pwrite_zeroes(req.offset, req.len, flags).await;
            let r = match r {
                Err(e) if flags.no_fallback && e.kind() == block_core::ErrorKind::Unsupported => {
                    return reply_error(
                        conn,
                        neg,
                        &req,
                        proto::err::ENOTSUP,
                        "fast zero not possible",
                    )
                    .await;
                }
                r => r,
            };
            reply_result(conn, neg, &req, r).await
        }
        cmd::TRIM => {
            let mut r = exp.blk.pdiscard(req.offset, req.len).await;
            if r.is_ok() && fua {
                r = exp.blk.flush().await;
            }
            reply_result(conn, neg, &req, r).await
        }
        cmd::FLUSH => {
            let r = exp.blk.flush().await;
            reply_result(conn, neg, &req, r).await
        }
        cmd::CACHE => {
            // A prefetch: read and drop, in bounded pieces.
            let mut off = req.offset;
            let end = req.offset + req.len;
            let mut r = Ok(());
            while off < end && r.is_ok() {
                let n = (end - off).min(proto::MAX_BUFFER);
                r = exp
                    .blk
                    .pread(off, IoBuf::for_read(n as usize))
                    .await
                    .map(|_| ());
                off += n;
            }
            reply_result(conn, neg, &req, r).await
        }
        cmd::BLOCK_STATUS => block_status(conn, neg, &req).await,
        _ => unreachable!("filtered above"),
    }
}

/// A read answered with data chunks and hole chunks, so clients see
/// sparseness without reading zeros.
async fn sparse_read(conn: &ConnHandle, neg: &Negotiated, req: &Request) -> std::io::Result<()> {
    let exp = &neg.export;
    let end = req.offset + req.len;
    let mut off = req.offset;
    while off < end {
        let st = match exp.blk.block_status_above(off, end - off).await {
            Ok(s) => s,
            Err(e) => return reply_error(conn, neg, req, errno_of(&e), &e.to_string()).await,
        };
        let n = st.len.min(end - off);
        let last = off + n >= end;
        let flags = if last { chunk::FLAG_DONE } else { 0 };
        if st.zero {
            let mut p = off.to_be_bytes().to_vec();
            p.extend_from_slice(&(n as u32).to_be_bytes());
            let h = proto::chunk_header(
                neg.extended,
                flags,
                chunk::OFFSET_HOLE,
                req.cookie,
                req.offset,
                p.len() as u64,
            );
            conn.send(&[&h, &p]).await?;
        } else {
            match exp.blk.pread(off, IoBuf::for_read(n as usize)).await {
                Ok(buf) => {
                    let h = proto::chunk_header(
                        neg.extended,
                        flags,
                        chunk::OFFSET_DATA,
                        req.cookie,
                        req.offset,
                        8 + n,
                    );
                    conn.send(&[&h, &off.to_be_bytes(), &buf]).await?;
                }
                Err(e) => return reply_error(conn, neg, req, errno_of(&e), &e.to_string()).await,
            }
        }
        off += n;
    }
    Ok(())
}

/// Extents of one context from `offset`, at most `len` bytes.
async fn extents(
    exp: &NbdExport,
    ctx: u32,
    offset: u64,
    len: u64,
    one: bool,
) -> BlockResult<Vec<(u64, u32)>> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    let end = offset + len;
    let mut off = offset;
    while off < end && out.len() < MAX_EXTENTS {
        let (n, flags) = match ctx {
            CTX_BASE_ALLOCATION => {
                let st = exp.blk.block_status_above(off, end - off).await?;
                let mut f = 0;
                if !st.data {
                    f |= proto::STATE_HOLE;
                }
                if st.zero {
                    f |= proto::STATE_ZERO;
                }
                (st.len, f)
            }
            CTX_ALLOCATION_DEPTH => allocation_depth(exp, off, end - off).await?,
            id => {
                let (dirty, n) = exp
                    .bitmaps
                    .get((id - CTX_DIRTY_BITMAP) as usize)
                    .map_or((false, end - off), |b| b.extent(off, end - off));
                (n, u32::from(dirty) * proto::STATE_DIRTY)
            }
        };
        let n = n.clamp(1, end - off);
        match out.last_mut() {
            Some((l, f)) if *f == flags => *l += n,
            _ => out.push((n, flags)),
        }
        off += n;
        if one {
            break;
        }
    }
    Ok(out)
}

/// qemu:allocation-depth: 0 unallocated, 1 in the top layer, N in the
/// (N-1)th backing node.
async fn allocation_depth(exp: &NbdExport, offset: u64, len: u64) -> BlockResult<(u64, u32)> {
    let mut node = Rc::clone(&exp.node);
    let mut depth = 1u32;
    // Each layer answers only within the run the layer above left
    // unallocated.
    let mut len = len;
    loop {
        if offset >= node.size() {
            return Ok((len, 0));
        }
        let st = node.block_status(offset, len).await?;
        if st.allocated {
            return Ok((st.len, depth));
        }
        len = st.len.clamp(1, len);
        match node.backing() {
            Some(b) => {
                node = b;
                depth += 1;
            }
            None => return Ok((len, 0)),
        }
    }
}

async fn block_status(conn: &ConnHandle, neg: &Negotiated, req: &Request) -> std::io::Result<()> {
    if neg.contexts.is_empty() {
        return reply_error(
            conn,
            neg,
            req,
            proto::err::EINVAL,
            "no metadata context selected",
        )
        .await;
    }
    let one = req.flags & cflag::REQ_ONE != 0;
    let count = neg.contexts.len();
    for (i, ctx) in neg.contexts.iter().enumerate() {
        let ext = match extents(&neg.export, *ctx, req.offset, req.len.max(1), one).await {
            Ok(e) => e,
            Err(e) => return reply_error(conn, neg, req, errno_of(&e), &e.to_string()).await,
        };
        let flags = if i + 1 == count { chunk::FLAG_DONE } else { 0 };
        let mut p = ctx.to_be_bytes().to_vec();
        let ty = if neg.extended {
            p.extend_from_slice(&(ext.len() as u32).to_be_bytes());
            for (l, f) in &ext {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&u64::from(*f).to_be_bytes());
            }
            chunk::BLOCK_STATUS_EXT
        } else {
            for (l, f) in &ext {
                p.extend_from_slice(&(*l.min(&(u32::MAX as u64 & !511)) as u32).to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
            }
            chunk::BLOCK_STATUS
        };
        let h = proto::chunk_header(
            neg.extended,
            flags,
            ty,
            req.cookie,
            req.offset,
            p.len() as u64,
        );
        conn.send(&[&h, &p]).await?;
    }
    Ok(())
}
