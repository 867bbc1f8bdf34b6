//! The event bus: engine events that front-ends turn into QMP events.
//!
//! Subscribers get every event in order through their own queue; the bus is
//! `Send + Sync` so that a front-end's monitor threads can subscribe, while
//! producers (the loop thread) only push.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

/// An engine event.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum BlockEvent {
    /// A write crossed a node's write threshold (which is then disabled).
    WriteThreshold {
        /// Node name.
        node_name: String,
        /// Bytes written beyond the threshold.
        amount_exceeded: u64,
        /// The threshold that was crossed.
        write_threshold: u64,
    },
    /// Image metadata was found corrupt.
    ImageCorrupted {
        /// Device or node name.
        device: String,
        /// Node name.
        node_name: String,
        /// What is wrong.
        msg: String,
        /// Offset of the offending metadata, if known.
        offset: Option<u64>,
        /// Size of the offending metadata, if known.
        size: Option<u64>,
        /// Whether the image was marked corrupt (and further writes refused).
        fatal: bool,
    },
    /// An I/O error reached a BlockBackend's error policy.
    IoError {
        /// Backend (device) name.
        device: String,
        /// Node name.
        node_name: String,
        /// "read" or "write".
        operation: &'static str,
        /// "ignore", "report" or "stop".
        action: &'static str,
        /// Whether the error was ENOSPC.
        nospace: bool,
        /// Error text.
        reason: String,
    },
}

/// A broadcast bus; clones share the subscriber list.
#[derive(Clone, Default)]
pub struct EventBus {
    subs: Arc<Mutex<Vec<Sender<BlockEvent>>>>,
}

impl EventBus {
    /// A bus with no subscriber.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribes; the receiver gets every event emitted from now on.
    pub fn subscribe(&self) -> Receiver<BlockEvent> {
        let (tx, rx) = channel();
        self.subs.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        rx
    }

    /// Sends `ev` to every live subscriber.
    pub fn emit(&self, ev: BlockEvent) {
        self.subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| s.send(ev.clone()).is_ok());
    }
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventBus")
    }
}
