//! `hsm::worker` serves the session pool: one thread per session, fed by one queue. A worker
//! takes the jobs queued when it wakes (all of them, up to [`BATCH`], when no other worker
//! waits idle; a fair share otherwise) and runs them in one pass on its session, drawing the
//! pass's random bytes with as few `C_GenerateRandom` calls as it can (one, once it has seen what
//! a job needs), so concurrent calls become batches instead of contention
//! for sessions. It keeps the fault model of a call: a retry on a fresh session, a last one after
//! re-initialising the module, the caller's deadline, the token's session cap, and officer
//! commands that need a session at that cap. It knows nothing of what a job does.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::Session;
use tokio::sync::oneshot;
use zeroize::{Zeroize, Zeroizing};

use super::error::classify;
use super::session::PooledSession;
use super::{HsmError, Inner, TokenSession, lock};

/// The most jobs one pass takes: enough to batch a burst, few enough that a pass does not keep
/// the jobs behind it from another worker for long.
const BATCH: usize = 64;
/// The most random bytes drawn at once; a pass that needs more draws again.
const RANDOM_FILL_MAX: usize = 16 * 1024;
/// What a job is assumed to need from the RNG before a pass has shown it (a DEK and an IV).
const RANDOM_PER_JOB_GUESS: usize = 64;
/// How often a worker without a session looks again whether it may open one (sessions closed
/// by the token or by a fault do not signal).
const SPARE_POLL: Duration = Duration::from_millis(20);

/// A call queued for a worker, its type erased.
pub(super) trait Job: Send {
    /// Whether the caller still waits for the answer.
    fn wanted(&self) -> bool;
    /// When the caller stops waiting.
    fn deadline(&self) -> Instant;
    /// Runs the call once on `session`. `Some(fault)` when the token or the session failed and
    /// the call may run again on a fresh one; `None` once the caller has its answer.
    fn attempt(&mut self, session: &mut TokenSession<'_>) -> Option<HsmError>;
    /// Answers the caller with `error`.
    fn fail(&mut self, error: HsmError);
}

/// One [`super::Hsm::run`] call: the operation, where its answer goes, and until when.
pub(super) struct Call<T, F> {
    pub(super) op: F,
    pub(super) reply: Option<oneshot::Sender<Result<T, HsmError>>>,
    pub(super) deadline: Instant,
}

impl<T, F> Call<T, F> {
    fn answer(&mut self, result: Result<T, HsmError>) {
        if let Some(reply) = self.reply.take() {
            // The caller may have stopped waiting meanwhile; nobody is left to tell.
            let _ = reply.send(result);
        }
    }
}

impl<T, F> Job for Call<T, F>
where
    T: Send,
    F: Fn(&mut TokenSession<'_>) -> Result<T, HsmError> + Send,
{
    fn wanted(&self) -> bool {
        self.reply.as_ref().is_some_and(|reply| !reply.is_closed())
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn attempt(&mut self, session: &mut TokenSession<'_>) -> Option<HsmError> {
        let result = session.verify_in_use().and_then(|()| (self.op)(session));
        match result {
            // A fresh session cannot mend a token that loses data: a failed self-test is final.
            Err(e) if e.is_unavailable() && !matches!(e, HsmError::SelfTest { .. }) => Some(e),
            other => {
                self.answer(other);
                None
            }
        }
    }

    fn fail(&mut self, error: HsmError) {
        self.answer(Err(error));
    }
}

/// The queue the workers serve.
pub(super) struct Queue {
    state: Mutex<State>,
    /// Wakes a worker that may take jobs: a job was queued, an officer wants a session, the
    /// pool was invalidated, or the pool closed.
    work: Condvar,
    /// Where workers without a session wait while the token allows no more sessions.
    spare: Condvar,
    /// Signalled as each worker ends.
    ended: Condvar,
    /// The worker threads, joined at close: a worker's count drops as its work ends, but its
    /// thread still runs its thread-local destructors after that (a PKCS#11 module's own, and
    /// OpenSSL's under Kryoptic and SoftHSM2). A process that exits meanwhile runs the module's
    /// exit-time clean-up under them: "double free or corruption" once, at the end of `hsm
    /// init` on Kryoptic.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

struct State {
    jobs: VecDeque<Box<dyn Job>>,
    /// Set when the last [`super::Hsm`] is dropped: the workers end.
    closed: bool,
    /// Workers waiting for work that may serve it.
    idle: usize,
    /// Workers not yet ended.
    live: usize,
}

impl Queue {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                closed: false,
                idle: 0,
                live: 0,
            }),
            work: Condvar::new(),
            spare: Condvar::new(),
            ended: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// Queues `job` for the next free worker.
    pub(super) fn push(&self, job: Box<dyn Job>) -> Result<(), HsmError> {
        let mut state = lock(&self.state);
        if state.closed {
            return Err(HsmError::Worker);
        }
        state.jobs.push_back(job);
        drop(state);
        self.work.notify_one();
        Ok(())
    }

    /// Puts jobs a worker could not serve back at the head of the queue, in their order.
    fn requeue(&self, jobs: Vec<Box<dyn Job>>) {
        let mut state = lock(&self.state);
        for job in jobs.into_iter().rev() {
            state.jobs.push_front(job);
        }
        drop(state);
        self.work.notify_one();
    }

    /// Wakes every worker, to look at its session (stale, or wanted by an officer).
    pub(super) fn wake_all(&self) {
        self.work.notify_all();
        self.spare.notify_all();
    }

    /// Ends the workers once they finish their pass, and waits until `deadline` for them to
    /// close their sessions: a process that exits while a worker is inside the module tears the
    /// module down under it (SoftHSM2 crashes). A hung worker is not waited for past `deadline`.
    pub(super) fn close(&self, deadline: Instant) {
        let mut state = lock(&self.state);
        state.closed = true;
        self.wake_all();
        while state.live > 0 {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(target: "keybroker::hsm", workers = state.live, "token workers still busy at shutdown");
                return;
            }
            state = self
                .ended
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        drop(state);
        // Every worker is past its last token call: what is left of each thread is its exit.
        let threads = std::mem::take(&mut *lock(&self.threads));
        let me = std::thread::current().id();
        for thread in threads {
            // Never the calling thread itself (joining oneself would never return).
            if thread.thread().id() != me {
                let _ = thread.join();
            }
        }
    }
}

/// Counts a worker as live until its thread ends, however it ends.
struct Live(Arc<Inner>);

impl Drop for Live {
    fn drop(&mut self) {
        let queue = &self.0.queue;
        lock(&queue.state).live -= 1;
        queue.ended.notify_all();
    }
}

/// Closes the queue when the last [`super::Hsm`] clone goes: the workers hold the pool's
/// `Inner` themselves, so its drop alone would never come.
pub(super) struct Shutdown(pub(super) Arc<Inner>);

impl Drop for Shutdown {
    fn drop(&mut self) {
        self.0.queue.close(Instant::now() + self.0.op_timeout);
    }
}

/// Starts `count` workers; the first gets `first`, the session opened at start-up.
///
/// # Errors
/// [`HsmError::Worker`] when not even one thread could be started.
pub(super) fn spawn(
    inner: &Arc<Inner>,
    count: usize,
    mut first: Option<PooledSession>,
) -> Result<(), HsmError> {
    let mut started = 0;
    for index in 0..count {
        let worker = Worker {
            inner: inner.clone(),
            session: first.take(),
            per_job: RANDOM_PER_JOB_GUESS,
        };
        lock(&inner.queue.state).live += 1;
        let live = Live(inner.clone());
        match std::thread::Builder::new()
            .name(format!("keybroker-hsm-{index}"))
            .spawn(move || {
                let _live = live;
                worker.serve();
            }) {
            Ok(thread) => {
                lock(&inner.queue.threads).push(thread);
                started += 1;
            }
            Err(e) => {
                tracing::warn!(target: "keybroker::hsm", error = %e, "cannot start a token worker thread");
            }
        }
    }
    if started == 0 {
        return Err(HsmError::Worker);
    }
    Ok(())
}

/// One worker thread and the session it owns.
struct Worker {
    inner: Arc<Inner>,
    session: Option<PooledSession>,
    /// Random bytes a job drew in the last pass that drew any: the size of the next draw.
    per_job: usize,
}

/// Why a worker could not get a session for a job.
enum NoSession {
    /// The token allows no more sessions than the other workers (and officers) hold: another
    /// worker serves the job.
    AtCap,
    /// The token failed.
    Fault(HsmError),
}

impl Worker {
    fn serve(mut self) {
        while let Some(batch) = self.next_batch() {
            self.pass(batch);
        }
        self.close_session();
    }

    /// Waits for jobs this worker may serve and takes up to [`BATCH`] of them; `None` once the
    /// pool is closed.
    fn next_batch(&mut self) -> Option<Vec<Box<dyn Job>>> {
        // A handle of our own: the session is closed (a `&mut self` call) while it is in use.
        let inner = self.inner.clone();
        let queue = &inner.queue;
        let mut state = lock(&queue.state);
        loop {
            if state.closed {
                return None;
            }
            if self.must_let_go() {
                // Closed outside the lock: C_CloseSession is a round trip on a network HSM.
                drop(state);
                self.close_session();
                state = lock(&queue.state);
                continue;
            }
            let may_serve = self.session.is_some() || inner.session_budget();
            if !may_serve {
                // A job meant for a worker that may serve it could have woken this one.
                if !state.jobs.is_empty() {
                    queue.work.notify_one();
                }
                state = queue
                    .spare
                    .wait_timeout(state, SPARE_POLL)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
                continue;
            }
            if !state.jobs.is_empty() {
                // A fair share when other workers wait idle: a token that answers slowly but in
                // parallel (a network HSM) still overlaps its sessions; when all are busy, a
                // worker back from its pass takes all that queued meanwhile.
                let take = state.jobs.len().div_ceil(state.idle + 1).min(BATCH);
                let batch: Vec<Box<dyn Job>> = state.jobs.drain(..take).collect();
                if !state.jobs.is_empty() {
                    queue.work.notify_one();
                }
                return Some(batch);
            }
            state.idle += 1;
            state = queue
                .work
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state.idle -= 1;
        }
    }

    /// Whether this worker should close its session now: it is stale (a fault elsewhere
    /// invalidated the pool), or an officer needs it and this worker took the request.
    fn must_let_go(&self) -> bool {
        match &self.session {
            None => false,
            Some(pooled) => {
                pooled.generation != self.inner.generation.load(Ordering::Acquire)
                    || self.inner.take_release_request()
            }
        }
    }

    /// Runs `batch` on this worker's session, one job after another, with the random bytes of
    /// the pass drawn together.
    fn pass(&mut self, batch: Vec<Box<dyn Job>>) {
        let jobs = batch.len();
        let mut random = PassRandom::new(jobs, self.per_job);
        let mut pending = batch.into_iter();
        while let Some(mut job) = pending.next() {
            if !self.run_job(job.as_mut(), &mut random) {
                // No session to be had: the jobs go back for a worker that has one.
                let mut back = vec![job];
                back.extend(pending);
                self.inner.queue.requeue(back);
                break;
            }
            random.job_done();
            if self.must_let_go() {
                self.close_session();
            }
        }
        if let Some(per_job) = random.per_job() {
            self.per_job = per_job;
        }
        tracing::trace!(target: "keybroker::hsm", jobs, random_calls = random.fills, "token pass");
    }

    /// One job: a try, a retry on a fresh session, and, when the token still cannot be reached,
    /// a last try after re-initialising the module (rate-limited; see
    /// [`super::context::Module::reinitialize`]). Returns `false` when the job was not served because
    /// this worker may not open a session.
    fn run_job(&mut self, job: &mut dyn Job, random: &mut PassRandom) -> bool {
        // A handle of our own, to hold the module shared while the session changes.
        let inner = self.inner.clone();
        let mut last_fault = None;
        for attempt in 0..3 {
            if !job.wanted() {
                return true;
            }
            if Instant::now() >= job.deadline() {
                job.fail(HsmError::Timeout(inner.op_timeout));
                return true;
            }
            if attempt == 2 {
                inner.module.reinitialize();
            }
            let _shared = inner.module.enter();
            match self.ensure_session() {
                Ok(()) => {}
                Err(NoSession::AtCap) => return false,
                Err(NoSession::Fault(e))
                    if e.is_unavailable() && !matches!(e, HsmError::Timeout(_)) =>
                {
                    inner.invalidate();
                    last_fault = Some(e);
                    continue;
                }
                Err(NoSession::Fault(e)) => {
                    job.fail(e);
                    return true;
                }
            }
            let Some(pooled) = self.session.as_mut() else {
                continue;
            };
            let mut session = TokenSession {
                inner: &inner,
                pooled,
                random: &mut *random,
            };
            // A panicking call must not take its worker (and a place in the pool) with it.
            let attempted =
                std::panic::catch_unwind(AssertUnwindSafe(|| job.attempt(&mut session)));
            let fault = match attempted {
                Ok(None) => return true,
                Ok(Some(fault)) => fault,
                Err(_) => {
                    tracing::error!(target: "keybroker::hsm", "a token call panicked; closing its session");
                    // The session may be left in the middle of an operation.
                    self.session = None;
                    random.discard();
                    job.fail(HsmError::Worker);
                    return true;
                }
            };
            tracing::warn!(target: "keybroker::hsm", error = %fault, attempt, "token call failed; reopening the session");
            self.session = None;
            // Nothing drawn from a session that failed is used again.
            random.discard();
            inner.invalidate();
            last_fault = Some(fault);
        }
        job.fail(last_fault.unwrap_or(HsmError::Worker));
        true
    }

    /// A live session of the current generation for this worker, opened if need be within the
    /// token's session cap.
    fn ensure_session(&mut self) -> Result<(), NoSession> {
        let generation = self.inner.generation.load(Ordering::Acquire);
        if self
            .session
            .as_ref()
            .is_some_and(|pooled| pooled.generation == generation)
        {
            return Ok(());
        }
        self.session = None;
        // One opening at a time: the check against the cap and the count it checks must not
        // change between them, or two workers would both take the last place.
        let _opening = lock(&self.inner.opening);
        if !self.inner.session_budget() {
            return Err(NoSession::AtCap);
        }
        match self.inner.open_session() {
            Ok(pooled) => {
                self.session = Some(pooled);
                Ok(())
            }
            Err(HsmError::Unavailable(CkError::Pkcs11(RvError::SessionCount, _)))
                if self.inner.open_sessions.load(Ordering::Acquire) > 0 =>
            {
                self.inner.lower_session_cap();
                Err(NoSession::AtCap)
            }
            Err(e) => Err(NoSession::Fault(e)),
        }
    }

    fn close_session(&mut self) {
        if let Some(pooled) = self.session.take() {
            let _shared = self.inner.module.enter();
            drop(pooled);
            // A place under the cap came free.
            self.inner.queue.spare.notify_all();
        }
    }
}

/// The random bytes of one pass: filled by one `C_GenerateRandom` sized for the jobs left in
/// the pass, handed out once each (and wiped from here as they are), and dropped with the pass,
/// zeroized. Nothing drawn is kept across passes.
pub(super) struct PassRandom {
    buf: Zeroizing<Vec<u8>>,
    next: usize,
    /// Jobs of the pass not yet finished, the current one included.
    jobs_left: usize,
    /// The expected draw per job, from earlier passes.
    per_job: usize,
    /// Bytes handed out and jobs finished in this pass, to size the next pass's draw.
    drawn: usize,
    jobs_done: usize,
    /// `C_GenerateRandom` calls made by this pass.
    fills: u32,
}

impl PassRandom {
    fn new(jobs: usize, per_job: usize) -> Self {
        Self {
            buf: Zeroizing::new(Vec::new()),
            next: 0,
            jobs_left: jobs,
            per_job,
            drawn: 0,
            jobs_done: 0,
            fills: 0,
        }
    }

    /// Fills `out` with bytes from the token's RNG, drawing from `session` when the pass's
    /// bytes are used up.
    ///
    /// # Errors
    /// Any token failure.
    pub(super) fn take(&mut self, session: &Session, out: &mut [u8]) -> Result<(), HsmError> {
        let len = out.len();
        if self.buf.len() - self.next < len {
            let want = self
                .jobs_left
                .max(1)
                .saturating_mul(self.per_job)
                .min(RANDOM_FILL_MAX)
                .max(len);
            let mut fresh = Zeroizing::new(vec![0u8; want]);
            session
                .generate_random_slice(&mut fresh)
                .map_err(classify)?;
            // The unused rest of the old draw is zeroized as it drops.
            self.buf = fresh;
            self.next = 0;
            self.fills = self.fills.saturating_add(1);
        }
        let end = self.next + len;
        let Some(bytes) = self.buf.get_mut(self.next..end) else {
            return Err(HsmError::Unexpected("random buffer shorter than drawn"));
        };
        out.copy_from_slice(bytes);
        // Each byte goes to one caller only, and lives on only where that caller keeps it.
        bytes.zeroize();
        self.next = end;
        self.drawn += len;
        Ok(())
    }

    fn job_done(&mut self) {
        self.jobs_left = self.jobs_left.saturating_sub(1);
        self.jobs_done += 1;
    }

    /// Drops what is left of the draw (after a fault).
    fn discard(&mut self) {
        self.buf = Zeroizing::new(Vec::new());
        self.next = 0;
    }

    /// The average draw per job of this pass, if it drew anything.
    fn per_job(&self) -> Option<usize> {
        (self.drawn > 0 && self.jobs_done > 0).then(|| self.drawn.div_ceil(self.jobs_done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_is_sized_from_the_last_one_and_never_below_a_request() {
        let mut random = PassRandom::new(4, 10);
        assert_eq!(random.per_job(), None);
        // No session here: only the sizing arithmetic.
        random.drawn = 88;
        random.jobs_done = 2;
        assert_eq!(random.per_job(), Some(44));
        random.discard();
        assert!(random.buf.is_empty());
    }
}
