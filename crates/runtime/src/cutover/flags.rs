//! The cutover flags as a process sees them: a watcher that learns of every change within
//! `poll` (LISTEN/NOTIFY wakes it at once; polling is the truth when a notification is lost)
//! and exports the value the process acts on, `trellis_cutover_flag_state{flag,value}`.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_domain::flags::{Executor, Flag};
use trellis_store::cutover::flags::{self as store, FlagRow};

use crate::instrument::FlagObserved;
use crate::relay::recv;

/// How often the flags are read even without a notification.
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// A flag's state: its value and the executor before it (the primary, in `shadow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub value: Executor,
    pub previous: Option<Executor>,
}

impl State {
    /// Whether `side` executes the processor: it is the flag's value, or the primary while the
    /// flag says `shadow` (the candidate only processes a copy).
    pub fn executes(&self, side: Executor) -> bool {
        self.value == side || (self.value == Executor::Shadow && self.previous == Some(side))
    }

    /// Whether `side` runs the candidate: the flag says `shadow` and the other side is the
    /// primary.
    pub fn is_candidate(&self, side: Executor) -> bool {
        self.value == Executor::Shadow && self.previous.is_some_and(|p| p != side && p != Executor::Shadow)
    }
}

/// The flags as last read; `None` until the first read succeeds.
#[derive(Clone)]
pub struct Flags {
    states: HashMap<Flag, watch::Receiver<Option<State>>>,
    /// Where the watcher and every gate's task run.
    tracker: TaskTracker,
}

impl Flags {
    /// Starts the watcher on `tracker`; it runs until `stop` (and each gate's task until then).
    pub fn watch(pool: PgPool, poll: Duration, tracker: &TaskTracker, stop: CancellationToken) -> Flags {
        let mut senders = HashMap::new();
        let mut states = HashMap::new();
        for flag in Flag::ALL {
            let (tx, rx) = watch::channel(None);
            senders.insert(flag, tx);
            states.insert(flag, rx);
        }
        tracker.spawn(watch_loop(pool, poll, senders, stop));
        Flags { states, tracker: tracker.clone() }
    }

    pub fn state(&self, flag: Flag) -> watch::Receiver<Option<State>> {
        self.states[&flag].clone()
    }

    /// True while `side` executes `flag`'s processor. Closed until the flags are first read, so
    /// that no side starts executing on a guess.
    pub fn gate(&self, flag: Flag, side: Executor) -> watch::Receiver<bool> {
        self.gate_on(flag, move |s| s.executes(side))
    }

    /// True while `side` runs `flag`'s candidate (see [`State::is_candidate`]).
    pub fn candidate_gate(&self, flag: Flag, side: Executor) -> watch::Receiver<bool> {
        self.gate_on(flag, move |s| s.is_candidate(side))
    }

    fn gate_on(&self, flag: Flag, open: impl Fn(State) -> bool + Send + Sync + 'static) -> watch::Receiver<bool> {
        let mut state = self.state(flag);
        let open = move |s: &Option<State>| s.is_some_and(&open);
        let (tx, rx) = watch::channel(open(&state.borrow()));
        self.tracker.spawn(async move {
            while state.changed().await.is_ok() {
                let now = open(&state.borrow_and_update());
                tx.send_if_modified(|was| std::mem::replace(was, now) != now);
                if tx.is_closed() {
                    return;
                }
            }
        });
        rx
    }
}

async fn watch_loop(
    pool: PgPool,
    poll: Duration,
    senders: HashMap<Flag, watch::Sender<Option<State>>>,
    stop: CancellationToken,
) {
    let mut listener: Option<PgListener> = None;
    loop {
        match store::list(&pool).await {
            Ok(rows) => publish(&senders, &rows),
            Err(e) => tracing::warn!(error = %e, "reading the cutover flags failed; keeping the last values"),
        }
        if listener.is_none() {
            listener = listen(&pool).await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
            got = recv(&mut listener) => {
                if let Err(e) = got {
                    tracing::warn!(error = %e, "flags LISTEN connection lost; polling until it is back");
                    listener = None;
                }
            }
        }
    }
}

async fn listen(pool: &PgPool) -> Option<PgListener> {
    let mut l = PgListener::connect_with(pool).await.ok()?;
    l.listen(store::CHANNEL).await.ok()?;
    Some(l)
}

fn publish(senders: &HashMap<Flag, watch::Sender<Option<State>>>, rows: &[FlagRow]) {
    for row in rows {
        let state = State { value: row.value, previous: row.previous };
        let changed =
            senders.get(&row.flag).is_some_and(|tx| tx.send_if_modified(|was| was.replace(state) != Some(state)));
        FlagObserved { flag: row.flag, value: row.value, changed }.emit();
    }
}

/// Runs `task` while `gate` is open: started each time it opens, its token cancelled when it
/// closes (and awaited), until `stop`. For the parts of a processor that are not a consumer
/// group (a scheduler), which must run on the executor's side only.
pub async fn while_open<F, Fut>(mut gate: watch::Receiver<bool>, stop: CancellationToken, task: F)
where
    F: Fn(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        tokio::select! {
            open = async { gate.wait_for(|open| *open).await.is_ok() } => if !open { return },
            _ = stop.cancelled() => return,
        }
        let token = stop.child_token();
        let run = task(token.clone());
        tokio::pin!(run);
        tokio::select! {
            _ = &mut run => {}
            closed = async { gate.wait_for(|open| !*open).await.is_ok() } => {
                token.cancel();
                run.await;
                if !closed {
                    return;
                }
            }
        }
        if stop.is_cancelled() {
            return;
        }
    }
}
