//! The single request path (QEMU's block/io.c).
//!
//! Every read, write, write_zeroes, discard, flush and block_status on a
//! node comes through here, whoever asks (a BlockBackend, a parent format
//! driver, a job). This is where the engine keeps its promises to drivers
//! (see `driver.rs`): requests are range-checked, padded to the driver's
//! alignment (read-modify-write for writes, a bounce buffer for misaligned
//! memory), split at `max_transfer`, tracked, and serialised against
//! overlapping read-modify-writes. Writes pass through zero detection and
//! the write threshold, and update `wr_highest_offset`, in one place.
//!
//! Reads on drivers with a mapping ([`BlockDriver::has_mapping`]) are served
//! by the generic loop in [`Node::read_mapped`]: data ranges go to the child
//! node's own request path, zero ranges are filled here, unallocated ranges
//! go to the backing node.
//!
//! [`BlockDriver::has_mapping`]: crate::driver::BlockDriver::has_mapping

use crate::buf::{is_zero, IoBuf};
use crate::driver::{BlockStatus, Mapping, Prealloc, WriteFlags, MAX_REQUEST_BYTES};
use crate::error::{Error, Result};
use crate::events::BlockEvent;
use crate::node::{DetectZeroes, Node};

/// Largest zero buffer written at once when a driver cannot write zeroes
/// natively.
const ZERO_CHUNK: u64 = 1 << 20;

fn round_down(x: u64, a: u64) -> u64 {
    x - x % a
}

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl Node {
    fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        if len > MAX_REQUEST_BYTES {
            return Err(Error::TooLarge {
                node: self.name().to_owned(),
                len,
                max: MAX_REQUEST_BYTES,
            });
        }
        if offset.checked_add(len).is_none_or(|e| e > i64::MAX as u64) {
            return Err(Error::OutOfRange {
                node: self.name().to_owned(),
                offset,
                len,
                size: self.size(),
            });
        }
        Ok(())
    }

    fn needs_bounce(&self, offset: u64, len: u64, buf: &IoBuf) -> bool {
        let a = self.limits.request_alignment as u64;
        !offset.is_multiple_of(a)
            || !len.is_multiple_of(a)
            || !buf.is_aligned(self.limits.min_mem_alignment)
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` and returns it.
    pub async fn pread(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(buf);
        }
        if !self.needs_bounce(offset, len, &buf) {
            let _t = self.tracked.begin(offset, offset + len, false).await;
            return self.read_aligned(offset, buf).await;
        }
        let a = self.limits.request_alignment as u64;
        let (start, end) = (round_down(offset, a), round_up(offset + len, a));
        let _t = self.tracked.begin(start, end, false).await;
        let bounce = self
            .read_aligned(start, IoBuf::for_read((end - start) as usize))
            .await?;
        let mut buf = buf;
        let head = (offset - start) as usize;
        buf.copy_from_slice(&bounce[head..head + len as usize]);
        Ok(buf)
    }

    async fn read_aligned(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let max = self
            .limits
            .max_transfer
            .max(self.limits.request_alignment as u64);
        if buf.len() as u64 <= max {
            return self.read_chunk(offset, buf).await;
        }
        let mut rest = buf;
        let mut out: Option<IoBuf> = None;
        let mut off = offset;
        while !rest.is_empty() {
            let n = (rest.len() as u64).min(max) as usize;
            let part = if n == rest.len() {
                std::mem::replace(&mut rest, IoBuf::zeroed(0))
            } else {
                rest.split_to(n)
            };
            let part = self.read_chunk(off, part).await?;
            off += n as u64;
            match &mut out {
                Some(o) => o.unsplit(part),
                None => out = Some(part),
            }
        }
        Ok(out.unwrap_or(rest))
    }

    async fn read_chunk(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        if self.driver.has_mapping() {
            self.read_mapped(offset, buf).await
        } else {
            self.driver.read(self, offset, buf).await
        }
    }

    /// The generic mapping loop: asks the driver where each piece lives and
    /// does the data I/O itself.
    async fn read_mapped(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let mut rest = buf;
        let mut out: Option<IoBuf> = None;
        let mut off = offset;
        while !rest.is_empty() {
            let want = rest.len() as u64;
            let (mapping, n) = self.driver.map(self, off, want).await?;
            if n == 0 {
                return Err(Error::Corrupt {
                    node: self.name().to_owned(),
                    detail: format!("driver mapped zero bytes at offset {off}"),
                });
            }
            let n = n.min(want) as usize;
            let part = if n == rest.len() {
                std::mem::replace(&mut rest, IoBuf::zeroed(0))
            } else {
                rest.split_to(n)
            };
            let part = match mapping {
                Mapping::Data {
                    child,
                    offset: host,
                } => {
                    // Boxed: the child's request path is this same function.
                    Box::pin(child.pread(host, part)).await?
                }
                Mapping::Zero => {
                    let mut p = part;
                    p.fill(0);
                    p
                }
                Mapping::Unallocated => Box::pin(self.read_backing(off, part)).await?,
                Mapping::Driver => self.driver.read(self, off, part).await?,
            };
            off += n as u64;
            match &mut out {
                Some(o) => o.unsplit(part),
                None => out = Some(part),
            }
        }
        Ok(out.unwrap_or(rest))
    }

    /// Reads an unallocated range from the backing node; beyond the backing
    /// node's end (or without one) it reads as zeros.
    async fn read_backing(&self, offset: u64, mut part: IoBuf) -> Result<IoBuf> {
        let Some(backing) = self.backing() else {
            part.fill(0);
            return Ok(part);
        };
        let bsize = backing.size();
        if offset >= bsize {
            part.fill(0);
            return Ok(part);
        }
        let avail = (bsize - offset).min(part.len() as u64) as usize;
        if avail == part.len() {
            return backing.pread(offset, part).await;
        }
        let mut tail = part;
        let head = tail.split_to(avail);
        let mut head = backing.pread(offset, head).await?;
        tail.fill(0);
        head.unsplit(tail);
        Ok(head)
    }

    fn writable(&self) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly {
                node: self.name().to_owned(),
            });
        }
        Ok(())
    }

    /// Called once per write before it reaches the driver: write threshold
    /// and dirty bitmaps (marked before the write, so that no reader of a
    /// bitmap misses a write in flight).
    fn before_write(&self, offset: u64, len: u64) {
        self.mark_dirty(offset, len);
        let end = offset + len;
        let threshold = self.write_threshold.get();
        if threshold > 0 && end > threshold {
            self.write_threshold.set(0);
            self.events.emit(BlockEvent::WriteThreshold {
                node_name: self.name().to_owned(),
                amount_exceeded: end - threshold,
                write_threshold: threshold,
            });
        }
    }

    fn mark_dirty(&self, offset: u64, len: u64) {
        for b in self.dirty_bitmaps.borrow().iter() {
            b.record_write(offset, len);
        }
    }

    /// Called once per successful write: bookkeeping.
    fn after_write(&self, offset: u64, len: u64) {
        let end = offset + len;
        if end > self.wr_highest_offset.get() {
            self.wr_highest_offset.set(end);
        }
    }

    /// Writes `buf` at `offset`; returns the buffer for reuse.
    pub async fn pwrite(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.writable()?;
        let len = buf.len() as u64;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(buf);
        }
        let fl = self.flags.get();
        if fl.detect_zeroes != DetectZeroes::Off && is_zero(&buf) {
            let zflags = WriteFlags {
                may_unmap: fl.detect_zeroes == DetectZeroes::Unmap && fl.discard_unmap,
                ..flags
            };
            self.pwrite_zeroes(offset, len, zflags).await?;
            return Ok(buf);
        }
        self.pwrite_inner(offset, buf, flags).await
    }

    /// A write without zero detection.
    async fn pwrite_inner(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let len = buf.len() as u64;
        self.before_write(offset, len);
        let buf = if !self.needs_bounce(offset, len, &buf) {
            let _t = self.tracked.begin(offset, offset + len, false).await;
            self.write_aligned(offset, buf, flags).await?
        } else {
            self.write_rmw(offset, buf, flags).await?
        };
        self.after_write(offset, len);
        Ok(buf)
    }

    /// Read-modify-write of an unaligned write, serialised against every
    /// overlapping request so no other write lands between read and write.
    async fn write_rmw(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let a = self.limits.request_alignment as u64;
        let len = buf.len() as u64;
        let (start, end) = (round_down(offset, a), round_up(offset + len, a));
        let _t = self.tracked.begin(start, end, true).await;
        let mut bounce = IoBuf::zeroed((end - start) as usize);
        if !offset.is_multiple_of(a) || !len.is_multiple_of(a) {
            // Read the partial head and tail blocks (one read when they are
            // the same block, or adjacent).
            let head_blk = start;
            let tail_blk = end - a;
            let mut first = bounce.split_to(a as usize);
            first = self.read_aligned(head_blk, first).await?;
            if tail_blk > head_blk && !(offset + len).is_multiple_of(a) {
                let mid_len = (tail_blk - head_blk - a) as usize;
                let mut mid = bounce.split_to(mid_len);
                let mut last = std::mem::replace(&mut bounce, IoBuf::zeroed(0));
                last = self.read_aligned(tail_blk, last).await?;
                mid.unsplit(last);
                first.unsplit(mid);
            } else {
                first.unsplit(bounce);
            }
            bounce = first;
        }
        let head = (offset - start) as usize;
        bounce[head..head + len as usize].copy_from_slice(&buf);
        self.write_aligned(start, bounce, flags).await?;
        Ok(buf)
    }

    async fn write_aligned(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let max = self
            .limits
            .max_transfer
            .max(self.limits.request_alignment as u64);
        if buf.len() as u64 <= max {
            return self.driver.write(self, offset, buf, flags).await;
        }
        let mut rest = buf;
        let mut out: Option<IoBuf> = None;
        let mut off = offset;
        while !rest.is_empty() {
            let n = (rest.len() as u64).min(max) as usize;
            let part = if n == rest.len() {
                std::mem::replace(&mut rest, IoBuf::zeroed(0))
            } else {
                rest.split_to(n)
            };
            let part = self.driver.write(self, off, part, flags).await?;
            off += n as u64;
            match &mut out {
                Some(o) => o.unsplit(part),
                None => out = Some(part),
            }
        }
        Ok(out.unwrap_or(rest))
    }

    /// Makes `[offset, offset+len)` read as zeros.
    pub async fn pwrite_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.writable()?;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let a = self.limits.request_alignment as u64;
        let (astart, aend) = (round_up(offset, a), round_down(offset + len, a));
        if astart >= aend {
            // Entirely inside one block: a plain (RMW) write of zeros.
            self.pwrite_inner(offset, IoBuf::zeroed(len as usize), no_detect(flags))
                .await?;
            return Ok(());
        }
        if astart > offset {
            self.pwrite_inner(
                offset,
                IoBuf::zeroed((astart - offset) as usize),
                no_detect(flags),
            )
            .await?;
        }
        self.before_write(astart, aend - astart);
        {
            let _t = self.tracked.begin(astart, aend, false).await;
            let max = self.limits.max_transfer.max(a);
            let mut off = astart;
            while off < aend {
                let n = (aend - off).min(round_down(max.max(a), a));
                match self.driver.write_zeroes(self, off, n, flags).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == crate::ErrorKind::Unsupported && !flags.no_fallback => {
                        self.write_zero_buffers(off, n, flags).await?;
                    }
                    Err(e) => return Err(e),
                }
                off += n;
            }
        }
        self.after_write(astart, aend - astart);
        if offset + len > aend {
            self.pwrite_inner(
                aend,
                IoBuf::zeroed((offset + len - aend) as usize),
                no_detect(flags),
            )
            .await?;
        }
        Ok(())
    }

    async fn write_zero_buffers(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let chunk = ZERO_CHUNK.min(len);
        let mut zeros = IoBuf::zeroed(chunk as usize);
        let mut off = offset;
        while off < offset + len {
            let n = (offset + len - off).min(chunk);
            if (zeros.len() as u64) != n {
                zeros = IoBuf::zeroed(n as usize);
            }
            zeros = self.driver.write(self, off, zeros, flags).await?;
            off += n;
        }
        Ok(())
    }

    /// Discards a range when the node was opened with `discard=unmap`;
    /// otherwise (and for partial blocks) it is a successful no-op, as a
    /// discard is only a hint.
    pub async fn pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        self.check_request(offset, len)?;
        if !self.flags.get().discard_unmap || len == 0 {
            return Ok(());
        }
        // As QEMU: a discard that goes ahead counts as a write, partial
        // blocks included.
        self.mark_dirty(offset, len);
        let a = self.limits.request_alignment as u64;
        let (start, end) = (round_up(offset, a), round_down(offset + len, a));
        if start >= end {
            return Ok(());
        }
        let _t = self.tracked.begin(start, end, false).await;
        self.driver.discard(self, start, end - start).await
    }

    /// Flushes the node (and, through its driver, everything below it).
    pub async fn flush(&self) -> Result<()> {
        self.driver.flush(self).await
    }

    /// Allocation status at `offset` for at most `len` bytes.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let size = self.size();
        if offset >= size {
            return Err(Error::OutOfRange {
                node: self.name().to_owned(),
                offset,
                len,
                size,
            });
        }
        let len = len.min(size - offset);
        let mut st = self.driver.block_status(self, offset, len).await?;
        st.len = st.len.clamp(1, len);
        Ok(st)
    }

    /// Block status of what this node reads, backing chain included
    /// (QEMU's `bdrv_block_status_above` down to the bottom): ranges not
    /// allocated here answer from the backing node, and below the chain,
    /// or past a shorter backing node, they read as zeros.
    pub async fn block_status_above(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let st = self.block_status(offset, len).await?;
        if st.allocated || st.zero {
            return Ok(st);
        }
        let zeros = |len| BlockStatus {
            len,
            data: false,
            zero: true,
            allocated: false,
            offset: None,
            file_node: None,
        };
        let Some(backing) = self.backing() else {
            return Ok(zeros(st.len));
        };
        let bsize = backing.size();
        if offset >= bsize {
            return Ok(zeros(st.len));
        }
        let n = st.len.min(bsize - offset);
        let mut below = Box::pin(backing.block_status_above(offset, n)).await?;
        below.len = below.len.min(n);
        below.allocated = false;
        Ok(below)
    }

    /// Resizes the node; waits for in-flight requests first.
    pub async fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> Result<()> {
        self.writable()?;
        if size > i64::MAX as u64 {
            return Err(Error::invalid("Image size must be less than 8 EiB!"));
        }
        self.tracked.drain().await;
        self.driver.truncate(self, size, exact, prealloc).await?;
        let size = self.size();
        for b in self.dirty_bitmaps.borrow().iter() {
            b.resize(size);
        }
        Ok(())
    }

    /// Waits until no request is in flight on this node.
    pub async fn drain(&self) {
        self.tracked.drain().await
    }

    /// Number of requests in flight on this node.
    pub fn in_flight(&self) -> usize {
        self.tracked.in_flight()
    }
}

fn no_detect(flags: WriteFlags) -> WriteFlags {
    WriteFlags {
        may_unmap: false,
        no_fallback: false,
        ..flags
    }
}
