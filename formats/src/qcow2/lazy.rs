//! Lazy refcounts: the dirty bit.
//!
//! Normally an L2 table that links a newly allocated cluster reaches the
//! disk only after the refcount block that counts the cluster, which costs
//! an extra flush each time both caches are written. With lazy refcounts
//! (the compatible feature bit, or the `lazy-refcounts` option) the image
//! is marked dirty before the first allocation instead, and from then on L2
//! tables and refcount blocks are written in any order: after a crash the
//! refcounts may be too low, and the next read-write open rebuilds them
//! from the metadata (see `open` in `mod.rs`) because the dirty bit is set.
//! A clean close writes everything and clears the bit.
//!
//! Frees keep their ordering (a refcount block that frees a cluster still
//! waits for the L2 table that stopped using it): a refcount too high only
//! leaks, but the freed cluster must not be handed out while an old L2
//! entry on disk still points to it.

use block_core::{IoBuf, Result, WriteFlags};

use super::header::INCOMPAT_DIRTY;
use super::Qcow2;

impl Qcow2 {
    /// Whether the dirty bit is set (in memory, which is ahead of or equal
    /// to the disk).
    pub(crate) fn is_dirty(&self) -> bool {
        self.hdr.borrow().incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Sets the dirty bit on disk, after everything written so far, so
    /// that later metadata may skip the refcount-first ordering. Called
    /// under `meta`.
    pub(crate) async fn mark_image_dirty(&self) -> Result<()> {
        if self.is_dirty() {
            return Ok(());
        }
        self.check_writable_meta()?;
        self.sync_now().await?;
        let v = self.hdr.borrow().incompatible_features | INCOMPAT_DIRTY;
        self.write_incompatible(v).await?;
        self.hdr.borrow_mut().incompatible_features = v;
        Ok(())
    }

    /// Clears the dirty bit once every table is on disk (after
    /// `flush_caches`, on close).
    pub(crate) async fn mark_image_clean(&self) -> Result<()> {
        if !self.is_dirty() || self.broken.get() {
            return Ok(());
        }
        self.sync_now().await?;
        let v = self.hdr.borrow().incompatible_features & !INCOMPAT_DIRTY;
        self.write_incompatible(v).await?;
        self.hdr.borrow_mut().incompatible_features = v;
        Ok(())
    }

    async fn write_incompatible(&self, v: u64) -> Result<()> {
        if let Err(e) = self.write_header_u64(72, v).await {
            self.broken.set(true);
            return Err(e);
        }
        Ok(())
    }

    /// Writes one 8-byte header field in place and syncs it (feature
    /// bits: nothing else in the header changes).
    pub(crate) async fn write_header_u64(&self, offset: u64, v: u64) -> Result<()> {
        self.file
            .pwrite(
                offset,
                IoBuf::from_slice(&v.to_be_bytes()),
                WriteFlags::default(),
            )
            .await?;
        self.sync_now().await
    }

    /// Writes all metadata, gives back the room made ahead in the file and
    /// marks the image clean: what closing a writable image takes. Called
    /// under `meta`.
    pub(crate) async fn settle_for_close(&self) -> Result<()> {
        self.flush_caches().await?;
        self.give_back_room().await?;
        self.mark_image_clean().await
    }

    /// What a writer leaves behind when it closes (or turns read-only):
    /// `bitmaps` stored, then [`Self::settle_for_close`]. A bitmap that
    /// cannot be stored must not keep the metadata from being written; it
    /// stays in use on disk. Called under `meta`.
    pub(crate) async fn store_bitmaps_and_settle(
        &self,
        bitmaps: &[std::rc::Rc<block_core::DirtyBitmap>],
    ) -> Result<()> {
        let stored = self.store_bitmaps(bitmaps).await;
        let settled = self.settle_for_close().await;
        stored.and(settled)
    }
}
