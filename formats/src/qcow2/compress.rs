//! Compressed clusters: decoding (deflate and zstd) for reads and
//! copy-on-write. Decompression runs on the loop's worker pool, never on
//! the loop thread; the metadata lookup before it runs under `meta`.

use std::cell::RefCell;

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

/// Compresses one cluster into `out`, returning the compressed length;
/// `None` when the result would not be smaller than `out.len()` (QEMU then
/// writes the cluster uncompressed).
///
/// Runs on the worker pool's threads, each of which keeps one compressor
/// per kind: setting one up costs as much as compressing a small cluster
/// (zstd allocates its tables, deflate its window and hash chains).
pub(crate) fn compress(kind: CompressionType, src: &[u8], out: &mut [u8]) -> Option<usize> {
    thread_local! {
        static DEFLATE: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
        static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { RefCell::new(None) };
    }
    match kind {
        CompressionType::Deflate => DEFLATE.with(|cell| {
            let mut cell = cell.borrow_mut();
            let c = cell.get_or_insert_with(|| {
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12)
            });
            c.reset();
            let r = c.compress(src, out, flate2::FlushCompress::Finish);
            match r {
                Ok(flate2::Status::StreamEnd) => Some(c.total_out() as usize),
                _ => None,
            }
        }),
        CompressionType::Zstd => ZSTD.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = Some(zstd::bulk::Compressor::new(0).ok()?);
            }
            let c = cell.as_mut()?;
            // Too small a buffer is an error: the cluster stays raw.
            let n = c.compress_to_buffer(src, out).ok()?;
            (n < out.len()).then_some(n)
        }),
    }
}

impl Qcow2 {
    /// Reads and decompresses the cluster described by `e`.
    pub(crate) async fn decompress_cluster(&self, e: L2Entry) -> Result<Vec<u8>> {
        let (off, len) = e.compressed_extent(self.cluster_bits);
        let buf = self.file.pread(off, IoBuf::zeroed(len as usize)).await?;
        let kind = self.hdr.borrow().compression_type;
        let cs = self.cluster_size as usize;
        let out = self
            .file
            .context()
            .run_on_worker(move || decompress(kind, &buf, cs))
            .await;
        out.ok_or_else(|| {
            self.corrupt(format!(
                "could not decompress the cluster at host offset {off:#x} ({len} bytes)"
            ))
        })
    }

    /// Serves a read of compressed clusters (the engine calls this for
    /// [`block_core::Mapping::Driver`] ranges).
    ///
    /// Compressed clusters written in order lie packed one after another
    /// in the file, so the clusters of one request are read with as few
    /// reads as their host extents allow and decompressed in one worker
    /// job per read: a cluster at a time, each read and each decompression
    /// was a hand-off to another thread and back, and those, not the
    /// decompression, made up most of the time.
    pub(crate) async fn read_compressed_range(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let cs = self.cluster_size;
        // (position in buf, offset in the cluster, bytes, host offset, host length)
        let mut parts = Vec::new();
        {
            let _m = self.meta.lock().await;
            let mut pos = 0usize;
            while pos < buf.len() {
                let g = offset + pos as u64;
                let e = self.l2_entry(g).await?;
                let in_c = (g & (cs - 1)) as usize;
                let n = (cs as usize - in_c).min(buf.len() - pos);
                if e.subtype(self.extended, 0) != SubType::Compressed {
                    return Err(Error::Corrupt {
                        node: self.node_name.clone(),
                        detail: format!("cluster at guest offset {g:#x} changed while reading"),
                    });
                }
                let (off, len) = e.compressed_extent(self.cluster_bits);
                parts.push((pos, in_c, n, off, len));
                pos += n;
            }
        }
        let kind = self.hdr.borrow().compression_type;
        let mut rest = &parts[..];
        while !rest.is_empty() {
            let k = packed_run(rest);
            let (run, next) = rest.split_at(k);
            rest = next;
            let start = run[0].3;
            let end = run.iter().map(|p| p.3 + p.4).max().unwrap_or(start);
            let host = self
                .file
                .pread(start, IoBuf::zeroed((end - start) as usize))
                .await?;
            let extents: Vec<(usize, usize)> = run
                .iter()
                .map(|p| ((p.3 - start) as usize, p.4 as usize))
                .collect();
            let csz = cs as usize;
            let out = self
                .file
                .context()
                .run_on_worker(move || {
                    extents
                        .iter()
                        .map(|&(at, len)| decompress(kind, &host[at..at + len], csz))
                        .collect::<Vec<_>>()
                })
                .await;
            for (p, c) in run.iter().zip(out) {
                let &(pos, in_c, n, off, len) = p;
                let c = c.ok_or_else(|| {
                    self.corrupt(format!(
                        "could not decompress the cluster at host offset {off:#x} ({len} bytes)"
                    ))
                })?;
                buf[pos..pos + n].copy_from_slice(&c[in_c..in_c + n]);
            }
        }
        Ok(buf)
    }
}

/// Most host bytes read at once for a run of compressed clusters.
const PACKED_READ_MAX: u64 = 2 << 20;

/// How many of the leading `parts` (as in `read_compressed_range`) lie close
/// enough together in the file to come from one read: each next extent
/// starts inside, or at most a sector after, what the run covers so far.
fn packed_run(parts: &[(usize, usize, usize, u64, u64)]) -> usize {
    let start = parts[0].3;
    let mut end = start + parts[0].4;
    let mut k = 1;
    for p in &parts[1..] {
        let (off, len) = (p.3, p.4);
        let new_end = end.max(off + len);
        if off < start || off > end + 512 || new_end - start > PACKED_READ_MAX {
            break;
        }
        end = new_end;
        k += 1;
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(seed: u8) -> Vec<u8> {
        (0..65536u32)
            .map(|i| {
                if i % 7 < 3 {
                    seed
                } else {
                    (i / 13) as u8 ^ seed
                }
            })
            .collect()
    }

    /// The compressors are kept per thread: each use must start from a
    /// clean state, whatever the last one left behind.
    #[test]
    fn reused_compressors_round_trip_every_cluster() {
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let a = cluster(1);
            let b = cluster(2);
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let noise: Vec<u8> = (0..65536)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let packed = |src: &[u8], max: usize| {
                let mut out = vec![0u8; max];
                compress(kind, src, &mut out).map(|n| out[..n].to_vec())
            };
            let ca = packed(&a, 65535).expect("compressible");
            assert_eq!(packed(&noise, 1024), None, "does not fit");
            let cb = packed(&b, 65535).expect("compressible");
            let ca2 = packed(&a, 65535).expect("compressible");
            assert_eq!(ca, ca2, "same input, same output after reuse");
            assert_eq!(decompress(kind, &ca, 65536).as_deref(), Some(&a[..]));
            assert_eq!(decompress(kind, &cb, 65536).as_deref(), Some(&b[..]));
        }
    }
}
