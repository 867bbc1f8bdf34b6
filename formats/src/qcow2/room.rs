//! Room made ahead in the image file for clusters not yet allocated.
//!
//! New clusters go at the end of the image file. A data write there either
//! extends the file or lands in a hole; on Linux file systems both take the
//! inode lock exclusively, and an O_DIRECT write that extends the file is
//! run synchronously, so allocating writes queue behind one another however
//! many are in flight. Zeroing each new cluster with a fallocate first
//! (what QEMU does) helps little: every fallocate also waits for all direct
//! I/O in flight on the file. So the driver grows the file in large steps
//! with one zero-range fallocate, and allocating writes then land in
//! allocated, zero-reading blocks inside the file, which the kernel writes
//! concurrently. On close the file is cut back to the last cluster in use.
//!
//! A crash leaves the unused room at the end of the file. That is harmless:
//! its clusters have refcount zero and read as zeros, `qemu-img check`
//! does not count them, and both QEMU and Strata allocate from the
//! refcounts, not from the file length.

use std::cell::Cell;
use std::rc::Rc;

use block_core::{Prealloc, Result, WriteFlags};

use super::Qcow2;

/// The smallest step the file grows by.
const MIN_STEP: u64 = 8 << 20;
/// The largest step, so that the unused room a crash leaves stays bounded.
const MAX_STEP: u64 = 128 << 20;

/// The part of the image file grown ahead of allocations.
#[derive(Default)]
pub(crate) struct FileRoom {
    /// File length before the first step (0: no room made yet).
    start: Cell<u64>,
    /// File length after the last step.
    end: Cell<u64>,
    /// Cleared when the file refuses a zero-range fallocate: the room is
    /// only an optimisation.
    refused: Cell<bool>,
}

impl Qcow2 {
    /// Makes sure the file reaches `end` (the end of a host range just
    /// allocated), growing it by a step when it does not. Called under
    /// `meta`, before the data write to the range.
    pub(crate) async fn grow_room(&self, end: u64) {
        let room = &self.room;
        if room.refused.get() || !Rc::ptr_eq(&self.data, &self.file) {
            return;
        }
        let have = room.end.get().max(self.file.size());
        if end <= have {
            return;
        }
        let cs = self.cluster_size;
        let step = (end / 4).clamp(MIN_STEP, MAX_STEP);
        let target = (end + step).div_ceil(cs) * cs;
        let zf = WriteFlags {
            no_fallback: true,
            ..WriteFlags::default()
        };
        match self.file.pwrite_zeroes(have, target - have, zf).await {
            Ok(()) => {
                if room.start.get() == 0 {
                    room.start.set(have);
                }
                room.end.set(target);
            }
            Err(_) => room.refused.set(true),
        }
    }

    /// Whether host range `[host, host+len)` lies in room made ahead, so it
    /// is allocated in the file and reads as zeros until written.
    pub(crate) fn in_room(&self, host: u64, len: u64) -> bool {
        let room = &self.room;
        room.start.get() != 0 && host >= room.start.get() && host + len <= room.end.get()
    }

    /// The file length without the room: where data and metadata end.
    pub(crate) fn data_end(&self) -> u64 {
        let room = &self.room;
        let fs = self.file.size();
        if room.start.get() != 0 && fs <= room.end.get() {
            room.start.get()
        } else {
            fs
        }
    }

    /// Where the file must end when the room is given back.
    fn used_file_end(&self) -> u64 {
        (self.end_cluster.get() << self.cluster_bits).max(self.data_end())
    }

    /// Cuts the file after the last cluster with a refcount (QEMU's
    /// `qcow2_get_last_cluster` scan), giving back any room too. Called
    /// after a shrink, with every table written.
    pub(crate) async fn cut_file_after_last_used(&self) -> Result<()> {
        let cs = self.cluster_size;
        let len = self.file.size();
        let mut end = len.div_ceil(cs);
        while end > 1 && self.get_refcount(end - 1).await? == 0 {
            end -= 1;
        }
        if end * cs < len {
            self.file.truncate(end * cs, false, Prealloc::Off).await?;
        }
        self.room.start.set(0);
        self.room.end.set(0);
        if self.end_cluster.get() > end {
            self.end_cluster.set(end);
        }
        Ok(())
    }

    /// Cuts the file back to the last cluster in use. Called on close
    /// after the metadata is written.
    pub(crate) async fn give_back_room(&self) -> Result<()> {
        let room = &self.room;
        if room.start.get() == 0 {
            return Ok(());
        }
        let keep = self.used_file_end();
        if self.file.size() > keep {
            self.file.truncate(keep, false, Prealloc::Off).await?;
        }
        room.start.set(0);
        room.end.set(0);
        Ok(())
    }
}
