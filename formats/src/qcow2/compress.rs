//! Compressed clusters: decoding (deflate and zstd) for reads and
//! copy-on-write. Decompression runs on the loop's worker pool, never on
//! the loop thread; the metadata lookup before it runs under `meta`.

use block_core::{Error, IoBuf, Result};

use super::header::CompressionType;
use super::l2::{L2Entry, SubType};
use super::Qcow2;

/// Decompresses one cluster of `cluster_size` bytes. Trailing bytes after
/// the compressed stream (sector padding) are ignored, as in QEMU.
pub(crate) fn decompress(
    kind: CompressionType,
    src: &[u8],
    cluster_size: usize,
) -> Option<Vec<u8>> {
    let mut out = vec![0u8; cluster_size];
    match kind {
        CompressionType::Deflate => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(src, &mut out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == cluster_size => Some(out),
                _ => None,
            }
        }
        CompressionType::Zstd => {
            use std::io::Read;
            let mut dec = zstd::stream::read::Decoder::with_buffer(src)
                .ok()?
                .single_frame();
            dec.read_exact(&mut out).ok()?;
            Some(out)
        }
    }
}

/// Compresses one cluster; `None` when the result would not be smaller
/// than `max_len` (QEMU then writes the cluster uncompressed).
pub(crate) fn compress(kind: CompressionType, src: &[u8], max_len: usize) -> Option<Vec<u8>> {
    match kind {
        CompressionType::Deflate => {
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = vec![0u8; max_len];
            match c.compress(src, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => {
                    out.truncate(c.total_out() as usize);
                    Some(out)
                }
                _ => None,
            }
        }
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(src, 0).ok()?;
            (out.len() < max_len).then_some(out)
        }
    }
}

impl Qcow2 {
    /// Reads and decompresses the cluster described by `e`.
    pub(crate) async fn decompress_cluster(&self, e: L2Entry) -> Result<Vec<u8>> {
        let (off, len) = e.compressed_extent(self.cluster_bits);
        let buf = self.file.pread(off, IoBuf::zeroed(len as usize)).await?;
        let kind = self.hdr.borrow().compression_type;
        let cs = self.cluster_size as usize;
        let data = buf.to_vec();
        let out = self
            .file
            .context()
            .run_on_worker(move || decompress(kind, &data, cs))
            .await;
        out.ok_or_else(|| {
            self.corrupt(format!(
                "could not decompress the cluster at host offset {off:#x} ({len} bytes)"
            ))
        })
    }

    /// Serves a read of compressed clusters (the engine calls this for
    /// [`block_core::Mapping::Driver`] ranges).
    pub(crate) async fn read_compressed_range(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let cs = self.cluster_size;
        let mut pos = 0usize;
        while pos < buf.len() {
            let g = offset + pos as u64;
            let e = {
                let _m = self.meta.lock().await;
                self.l2_entry(g).await?
            };
            let in_c = (g & (cs - 1)) as usize;
            let n = (cs as usize - in_c).min(buf.len() - pos);
            if e.subtype(self.extended, 0) != SubType::Compressed {
                return Err(Error::Corrupt {
                    node: self.node_name.clone(),
                    detail: format!("cluster at guest offset {g:#x} changed while reading"),
                });
            }
            let c = self.decompress_cluster(e).await?;
            buf[pos..pos + n].copy_from_slice(&c[in_c..in_c + n]);
            pos += n;
        }
        Ok(buf)
    }
}
