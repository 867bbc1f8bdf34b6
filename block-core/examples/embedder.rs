//! A VMM-style embedder: the block layer runs on its own loop thread, and a
//! "vCPU" thread does I/O on a raw image through a `LoopHandle`.
//!
//! Run: `cargo run -p block-core --example embedder -- /path/to/disk.raw`
//! (the file is created, 64 MiB, when it does not exist).

use std::rc::Rc;

use block_core::{
    AioMode, BlockBackend, EventBus, EventLoop, Graph, IoBuf, LoopHandle, Options, Perm, WriteFlags,
};

/// What a vCPU thread holds: a handle to the loop. The graph and backend
/// (`Rc`, not `Send`) never leave the loop thread.
struct Disk {
    handle: LoopHandle,
}

thread_local! {
    /// The loop thread's graph and the device's backend.
    static DEVICE: std::cell::RefCell<Option<(Rc<Graph>, Rc<BlockBackend>)>> =
        const { std::cell::RefCell::new(None) };
}

fn device() -> Rc<BlockBackend> {
    DEVICE.with(|d| {
        d.borrow()
            .as_ref()
            .map(|(_, b)| Rc::clone(b))
            .expect("device attached")
    })
}

impl Disk {
    fn write(&self, offset: u64, data: Vec<u8>) -> block_core::Result<()> {
        self.handle
            .submit(move |_ctx| async move {
                device()
                    .pwrite(offset, IoBuf::from_slice(&data), WriteFlags::default())
                    .await
                    .map(|_| ())
            })
            .wait()?
    }

    fn read(&self, offset: u64, len: usize) -> block_core::Result<Vec<u8>> {
        self.handle
            .submit(move |_ctx| async move {
                device()
                    .pread(offset, IoBuf::zeroed(len))
                    .await
                    .map(|b| b.to_vec())
            })
            .wait()?
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/var/tmp/strata-embedder.raw".to_owned());
    if !std::path::Path::new(&path).exists() {
        std::fs::File::create(&path)?.set_len(64 << 20)?;
    }

    // The block layer's loop thread.
    let handle = EventLoop::spawn_thread("block-loop", AioMode::Auto)?;
    let p = path.clone();
    handle
        .submit(move |ctx| async move {
            let graph = Rc::new(Graph::new(ctx, formats::registry(), EventBus::new()));
            let opts = Options::new()
                .with("driver", "raw")
                .with("node-name", "disk0")
                .with("file.driver", "file")
                .with("file.filename", p.as_str());
            let node = graph.open(opts).await?;
            let blk = BlockBackend::new(
                "virtio0",
                &node,
                Perm::CONSISTENT_READ | Perm::WRITE,
                Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            )?;
            println!(
                "opened {} on the {} engine",
                node.name(),
                node.context().engine_name()
            );
            DEVICE.with(|d| *d.borrow_mut() = Some((graph, blk)));
            Ok::<_, block_core::Error>(())
        })
        .wait()??;

    let disk = Disk {
        handle: handle.clone(),
    };
    // A "vCPU" thread doing guest I/O.
    let vcpu = std::thread::spawn(move || -> block_core::Result<()> {
        disk.write(4096, vec![0x42; 8192])?;
        let back = disk.read(4096, 8192)?;
        assert!(back.iter().all(|&b| b == 0x42));
        println!("vCPU thread wrote and read back 8 KiB at offset 4096");
        Ok(())
    });
    vcpu.join().expect("vCPU thread")?;
    // Shut down: flush and close every node on the loop thread, then stop it.
    handle
        .submit(|_ctx| async move {
            let Some((graph, blk)) = DEVICE.with(|d| d.borrow_mut().take()) else {
                return Ok(());
            };
            blk.flush().await?;
            drop(blk);
            graph.close_all().await
        })
        .wait()??;
    handle.stop();
    Ok(())
}
