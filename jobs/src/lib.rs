//! Block jobs for Strata: the job framework with QEMU's state machine and the
//! jobs built on it (today: image creation; backup, mirror, stream, commit
//! and dump come with their issues).
//!
//! Jobs run as tasks on the loop thread that owns the graph ([`JobManager`]
//! is `Rc`-shared there and never crosses threads). A job's work is a boxed
//! future ([`JobBody`]); the framework drives it through QEMU's states
//! (`created → running → waiting → pending → concluded → null`, with
//! `aborting` on error or cancel), honours `auto-finalize`/`auto-dismiss`,
//! and reports every transition to one listener, which a front-end turns
//! into `JOB_STATUS_CHANGE` events. No JSON here.
#![forbid(unsafe_code)]

pub mod create;
mod job;

pub use job::{
    Job, JobBody, JobError, JobInfo, JobListener, JobManager, JobOptions, JobStatus, JobType,
    JobVerb,
};
