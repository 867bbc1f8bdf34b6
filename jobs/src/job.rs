//! The job state machine (QEMU's `job.c`) and the per-loop job list.
//!
//! Lives on the graph's loop thread. Transitions follow QEMU's
//! `JobSTT` table and verbs are checked against `JobVerbTable`, so the
//! errors for e.g. dismissing a running job have QEMU's wording.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use block_core::AioContext;

/// A job's work: resolves to `Ok(())` or the error text users see in
/// `query-jobs`' `error` member.
pub type JobBody = Pin<Box<dyn Future<Output = Result<(), String>>>>;

/// Receives every status change: `(job id, new status)`.
pub type JobListener = Rc<dyn Fn(&str, JobStatus)>;

/// QEMU's `JobStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Not yet set up.
    Undefined,
    /// Created, not started.
    Created,
    /// Doing its work.
    Running,
    /// Paused by the user.
    Paused,
    /// Work done, waiting for `complete` (mirror).
    Ready,
    /// Paused while ready.
    Standby,
    /// Waiting for other jobs of its transaction.
    Waiting,
    /// Waiting for `job-finalize`.
    Pending,
    /// Failing or cancelled, cleaning up.
    Aborting,
    /// Finished; waiting for `job-dismiss`.
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// QEMU's `JobType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobType {
    /// block-commit
    Commit,
    /// block-stream
    Stream,
    /// mirror
    Mirror,
    /// backup
    Backup,
    /// blockdev-create
    Create,
    /// x-blockdev-amend
    Amend,
}

impl JobType {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            JobType::Commit => "commit",
            JobType::Stream => "stream",
            JobType::Mirror => "mirror",
            JobType::Backup => "backup",
            JobType::Create => "create",
            JobType::Amend => "amend",
        }
    }
}

/// Commands a job accepts (QEMU's `JobVerb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobVerb {
    /// job-cancel
    Cancel,
    /// job-pause
    Pause,
    /// job-resume
    Resume,
    /// job-set-speed
    SetSpeed,
    /// job-complete
    Complete,
    /// job-finalize
    Finalize,
    /// job-dismiss
    Dismiss,
    /// job-change
    Change,
}

impl JobVerb {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }
}

/// QEMU's `JobSTT`: `STT[from][to]`, states in [`JobStatus`] order.
const STT: [[bool; 11]; 11] = {
    const T: bool = true;
    const F: bool = false;
    [
        /* U */ [F, T, F, F, F, F, F, F, F, F, F],
        /* C */ [F, F, T, F, F, F, F, F, T, F, T],
        /* R */ [F, F, F, T, T, F, T, F, T, F, F],
        /* P */ [F, F, T, F, F, F, F, F, F, F, F],
        /* Y */ [F, F, F, F, F, T, T, F, T, F, F],
        /* S */ [F, F, F, F, T, F, F, F, F, F, F],
        /* W */ [F, F, F, F, F, F, F, T, T, F, F],
        /* D */ [F, F, F, F, F, F, F, F, T, T, F],
        /* X */ [F, F, F, F, F, F, F, F, T, T, F],
        /* E */ [F, F, F, F, F, F, F, F, F, F, T],
        /* N */ [F, F, F, F, F, F, F, F, F, F, F],
    ]
};

/// QEMU's `JobVerbTable`: which states accept a verb.
fn verb_allowed(verb: JobVerb, s: JobStatus) -> bool {
    use JobStatus::*;
    match verb {
        JobVerb::Cancel => matches!(s, Created | Running | Paused | Ready | Standby | Pending),
        JobVerb::Pause | JobVerb::SetSpeed | JobVerb::Change => {
            matches!(s, Created | Running | Paused | Ready | Standby)
        }
        JobVerb::Resume => matches!(s, Created | Running | Paused | Ready | Standby),
        JobVerb::Complete => matches!(s, Ready),
        JobVerb::Finalize => matches!(s, Pending),
        JobVerb::Dismiss => matches!(s, Concluded),
    }
}

/// Errors of job commands, worded as QEMU words them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// No job with that id.
    #[error("Job not found")]
    NotFound,
    /// The id is taken.
    #[error("Job ID '{0}' already in use")]
    Duplicate(String),
    /// The id is not a well-formed identifier.
    #[error("Invalid job ID '{0}'")]
    InvalidId(String),
    /// The job's state does not accept the verb.
    #[error("Job '{id}' in state '{}' cannot accept command verb '{}'", status.name(), verb.name())]
    BadState {
        /// Job id.
        id: String,
        /// Its status.
        status: JobStatus,
        /// The refused verb.
        verb: JobVerb,
    },
}

/// Creation options common to all jobs.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// The job id.
    pub id: String,
    /// Its type.
    pub ty: JobType,
    /// Finalize without waiting for `job-finalize`.
    pub auto_finalize: bool,
    /// Disappear once concluded, without `job-dismiss`.
    pub auto_dismiss: bool,
}

/// One row of `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Job type.
    pub ty: JobType,
    /// Current status.
    pub status: JobStatus,
    /// Progress so far.
    pub current_progress: u64,
    /// Estimated total.
    pub total_progress: u64,
    /// Error text once failed.
    pub error: Option<String>,
}

/// One job.
pub struct Job {
    opts: JobOptions,
    status: Cell<JobStatus>,
    progress: Cell<(u64, u64)>,
    error: RefCell<Option<String>>,
    cancelled: Cell<bool>,
    cancel_waker: RefCell<Option<Waker>>,
    finalize_waker: RefCell<Option<Waker>>,
    finalized: Cell<bool>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.opts.id)
            .field("status", &self.status.get())
            .finish()
    }
}

impl Job {
    /// The id.
    pub fn id(&self) -> &str {
        &self.opts.id
    }

    /// The current status.
    pub fn status(&self) -> JobStatus {
        self.status.get()
    }

    /// Sets progress `(current, total)`; jobs call this as they go.
    pub fn set_progress(&self, current: u64, total: u64) {
        self.progress.set((current, total));
    }

    fn info(&self) -> JobInfo {
        let (c, t) = self.progress.get();
        JobInfo {
            id: self.opts.id.clone(),
            ty: self.opts.ty,
            status: self.status.get(),
            current_progress: c,
            total_progress: t,
            error: self.error.borrow().clone(),
        }
    }
}

/// Resolves when the job is cancelled.
struct Cancelled(Rc<Job>);

impl Future for Cancelled {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.cancelled.get() {
            Poll::Ready(())
        } else {
            *self.0.cancel_waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// Resolves when the job may finalize.
struct Finalized(Rc<Job>);

impl Future for Finalized {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.finalized.get() || self.0.cancelled.get() {
            Poll::Ready(())
        } else {
            *self.0.finalize_waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// Runs `a` until done or until `b` completes first (then `None`).
async fn until<A: Future, B: Future>(a: A, b: B) -> Option<A::Output> {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if b.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// The jobs of one loop.
pub struct JobManager {
    ctx: Rc<AioContext>,
    jobs: RefCell<Vec<Rc<Job>>>,
    listener: JobListener,
}

fn id_wellformed(id: &str) -> bool {
    block_core::graph::id_wellformed(id)
}

impl JobManager {
    /// A manager whose jobs run on `ctx` and report to `listener`.
    pub fn new(ctx: Rc<AioContext>, listener: JobListener) -> Rc<Self> {
        Rc::new(JobManager {
            ctx,
            jobs: RefCell::new(Vec::new()),
            listener,
        })
    }

    fn find(&self, id: &str) -> Result<Rc<Job>, JobError> {
        self.jobs
            .borrow()
            .iter()
            .find(|j| j.opts.id == id)
            .cloned()
            .ok_or(JobError::NotFound)
    }

    fn transition(&self, job: &Job, to: JobStatus) {
        let from = job.status.get();
        debug_assert!(
            STT[from.index()][to.index()],
            "illegal job transition {from:?} -> {to:?}"
        );
        job.status.set(to);
        (self.listener)(&job.opts.id, to);
        if to == JobStatus::Null {
            self.jobs.borrow_mut().retain(|j| j.opts.id != job.opts.id);
        }
    }

    fn check_verb(job: &Job, verb: JobVerb) -> Result<(), JobError> {
        if verb_allowed(verb, job.status.get()) {
            Ok(())
        } else {
            Err(JobError::BadState {
                id: job.opts.id.clone(),
                status: job.status.get(),
                verb,
            })
        }
    }

    /// Checks that a job with `id` could be created now.
    pub fn check_new_id(&self, id: &str) -> Result<(), JobError> {
        if !id_wellformed(id) {
            return Err(JobError::InvalidId(id.to_owned()));
        }
        if self.find(id).is_ok() {
            return Err(JobError::Duplicate(id.to_owned()));
        }
        Ok(())
    }

    /// Creates a job and starts it; the body runs as a task on the loop.
    /// Emits `created` now and `running` when the task starts.
    pub fn start(self: &Rc<Self>, opts: JobOptions, body: JobBody) -> Result<Rc<Job>, JobError> {
        self.check_new_id(&opts.id)?;
        let job = Rc::new(Job {
            opts,
            status: Cell::new(JobStatus::Undefined),
            progress: Cell::new((0, 0)),
            error: RefCell::new(None),
            cancelled: Cell::new(false),
            cancel_waker: RefCell::new(None),
            finalize_waker: RefCell::new(None),
            finalized: Cell::new(false),
        });
        self.jobs.borrow_mut().push(Rc::clone(&job));
        self.transition(&job, JobStatus::Created);
        let me = Rc::clone(self);
        let j = Rc::clone(&job);
        self.ctx
            .spawn_detached(async move { me.run(j, body).await });
        Ok(job)
    }

    async fn run(self: Rc<Self>, job: Rc<Job>, body: JobBody) {
        if job.cancelled.get() {
            // Cancelled before it ran: created -> aborting.
            self.fail(&job, "Operation canceled".into());
            return;
        }
        self.transition(&job, JobStatus::Running);
        let res = until(body, Cancelled(Rc::clone(&job))).await;
        let res = match res {
            Some(Ok(())) if job.cancelled.get() => Err("Operation canceled".to_owned()),
            Some(r) => r,
            None => Err("Operation canceled".to_owned()),
        };
        match res {
            Err(e) => self.fail(&job, e),
            Ok(()) => {
                let (_, t) = job.progress.get();
                job.progress.set((t.max(1), t.max(1)));
                self.transition(&job, JobStatus::Waiting);
                self.transition(&job, JobStatus::Pending);
                if !job.opts.auto_finalize {
                    Finalized(Rc::clone(&job)).await;
                    if job.cancelled.get() {
                        self.fail(&job, "Operation canceled".into());
                        return;
                    }
                }
                self.transition(&job, JobStatus::Concluded);
                if job.opts.auto_dismiss {
                    self.transition(&job, JobStatus::Null);
                }
            }
        }
    }

    fn fail(&self, job: &Job, err: String) {
        *job.error.borrow_mut() = Some(err);
        if job.progress.get().1 == 0 {
            job.progress.set((1, 1));
        }
        self.transition(job, JobStatus::Aborting);
        self.transition(job, JobStatus::Concluded);
        if job.opts.auto_dismiss {
            self.transition(job, JobStatus::Null);
        }
    }

    /// `query-jobs` (newest first, as QEMU lists them).
    pub fn query(&self) -> Vec<JobInfo> {
        self.jobs.borrow().iter().rev().map(|j| j.info()).collect()
    }

    /// Whether a job with this id exists.
    pub fn exists(&self, id: &str) -> bool {
        self.find(id).is_ok()
    }

    /// `job-resume`: only paused jobs can resume (none can pause yet).
    pub fn resume(&self, id: &str) -> Result<(), String> {
        let job = self.find(id).map_err(|e| e.to_string())?;
        if job.status.get() != JobStatus::Paused {
            return Err("Can't resume a job that was not paused".into());
        }
        Ok(())
    }

    /// `job-cancel`.
    pub fn cancel(&self, id: &str) -> Result<(), JobError> {
        let job = self.find(id)?;
        Self::check_verb(&job, JobVerb::Cancel)?;
        job.cancelled.set(true);
        if let Some(w) = job.cancel_waker.borrow_mut().take() {
            w.wake();
        }
        if let Some(w) = job.finalize_waker.borrow_mut().take() {
            w.wake();
        }
        Ok(())
    }

    /// `job-finalize`.
    pub fn finalize(&self, id: &str) -> Result<(), JobError> {
        let job = self.find(id)?;
        Self::check_verb(&job, JobVerb::Finalize)?;
        job.finalized.set(true);
        if let Some(w) = job.finalize_waker.borrow_mut().take() {
            w.wake();
        }
        Ok(())
    }

    /// `job-dismiss`.
    pub fn dismiss(&self, id: &str) -> Result<(), JobError> {
        let job = self.find(id)?;
        Self::check_verb(&job, JobVerb::Dismiss)?;
        self.transition(&job, JobStatus::Null);
        Ok(())
    }

    /// A verb this framework does not implement for any job yet (pause,
    /// resume, complete, set-speed): QEMU's state check, then its answer
    /// for jobs without that ability.
    pub fn unsupported_verb(&self, id: &str, verb: JobVerb) -> Result<(), String> {
        let job = self.find(id).map_err(|e| e.to_string())?;
        Self::check_verb(&job, verb).map_err(|e| e.to_string())?;
        Err(format!(
            "The active block job '{}' cannot be {}",
            id,
            match verb {
                JobVerb::Complete => "completed",
                JobVerb::Pause => "paused",
                _ => "changed",
            }
        ))
    }

    /// Whether any job is not yet concluded.
    pub fn busy(&self) -> bool {
        self.jobs
            .borrow()
            .iter()
            .any(|j| !matches!(j.status.get(), JobStatus::Concluded | JobStatus::Null))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_core::{AioMode, EventLoop};

    fn setup() -> (EventLoop, Rc<JobManager>, Rc<RefCell<Vec<String>>>) {
        let el = EventLoop::new(AioMode::Threads).unwrap();
        let log = Rc::new(RefCell::new(Vec::new()));
        let l = Rc::clone(&log);
        let m = JobManager::new(
            Rc::clone(el.context()),
            Rc::new(move |id: &str, s: JobStatus| {
                l.borrow_mut().push(format!("{id}:{}", s.name()))
            }),
        );
        (el, m, log)
    }

    fn opts(id: &str, fin: bool, dis: bool) -> JobOptions {
        JobOptions {
            id: id.into(),
            ty: JobType::Create,
            auto_finalize: fin,
            auto_dismiss: dis,
        }
    }

    #[test]
    fn success_path_like_qemu() {
        let (el, m, log) = setup();
        m.start(opts("j1", true, false), Box::pin(async { Ok(()) }))
            .unwrap();
        el.block_on(block_core::aio::yield_now());
        el.block_on(block_core::aio::yield_now());
        assert_eq!(
            *log.borrow(),
            [
                "j1:created",
                "j1:running",
                "j1:waiting",
                "j1:pending",
                "j1:concluded"
            ]
        );
        assert_eq!(m.query()[0].current_progress, 1);
        assert_eq!(
            m.cancel("j1").unwrap_err().to_string(),
            "Job 'j1' in state 'concluded' cannot accept command verb 'cancel'"
        );
        m.dismiss("j1").unwrap();
        assert!(m.query().is_empty());
        assert_eq!(m.dismiss("j1").unwrap_err().to_string(), "Job not found");
    }

    #[test]
    fn failure_and_manual_finalize() {
        let (el, m, log) = setup();
        m.start(
            opts("bad", true, true),
            Box::pin(async { Err("boom".into()) }),
        )
        .unwrap();
        m.start(opts("man", false, false), Box::pin(async { Ok(()) }))
            .unwrap();
        assert_eq!(
            m.start(opts("man", false, false), Box::pin(async { Ok(()) }))
                .unwrap_err()
                .to_string(),
            "Job ID 'man' already in use"
        );
        for _ in 0..3 {
            el.block_on(block_core::aio::yield_now());
        }
        assert!(log.borrow().contains(&"bad:aborting".to_string()));
        assert!(log.borrow().contains(&"bad:null".to_string()));
        assert_eq!(m.query().len(), 1);
        assert_eq!(m.query()[0].status, JobStatus::Pending);
        m.finalize("man").unwrap();
        for _ in 0..3 {
            el.block_on(block_core::aio::yield_now());
        }
        assert_eq!(m.query()[0].status, JobStatus::Concluded);
    }

    #[test]
    fn cancel_running() {
        let (el, m, _log) = setup();
        m.start(
            opts("c", true, false),
            Box::pin(std::future::pending::<Result<(), String>>()),
        )
        .unwrap();
        el.block_on(block_core::aio::yield_now());
        m.cancel("c").unwrap();
        for _ in 0..3 {
            el.block_on(block_core::aio::yield_now());
        }
        let q = m.query();
        assert_eq!(q[0].status, JobStatus::Concluded);
        assert_eq!(q[0].error.as_deref(), Some("Operation canceled"));
    }
}
