//! The priority scheduler: a few batches at a time per process (its slots), chosen by strict
//! priority with aging.
//!
//! Each priority's consumer groups hand their batches to [`PriorityScheduler::enter`] and wait for a turn.
//! When a slot is free, the next turn goes to:
//! 1. on an *aging turn*: the waiting batch of a lower priority (P1–P3) whose oldest message has
//!    waited longer than its priority's maximum wait (the most overdue one if several are);
//! 2. otherwise: the waiting batch of the highest priority.
//!
//! P0 also has a slot of its own: a P0 batch may start while every regular slot is busy, so it
//! never waits behind lower-priority batches (it waits only behind other P0 batches).
//!
//! Aging turns alternate with strict turns: a turn after an aged batch is always a strict one.
//! Without that, a backlog that is entirely overdue (every P3 older than an hour) would take
//! every turn and starve P1 and P2; with it, an overdue priority gets at least every other
//! turn.

use std::sync::Mutex;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::oneshot;
use trellis_domain::disputes::Priority;

/// How long a priority's oldest waiting message may wait before it takes the next turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxWaits {
    pub p1: Duration,
    pub p2: Duration,
    pub p3: Duration,
}

impl Default for MaxWaits {
    fn default() -> Self {
        Self { p1: Duration::from_secs(60), p2: Duration::from_secs(600), p3: Duration::from_secs(3600) }
    }
}

impl MaxWaits {
    /// `None` for P0, which never needs aging.
    pub fn of(&self, p: Priority) -> Option<Duration> {
        match p {
            Priority::P0 => None,
            Priority::P1 => Some(self.p1),
            Priority::P2 => Some(self.p2),
            Priority::P3 => Some(self.p3),
        }
    }
}

struct Waiter {
    priority: Priority,
    oldest: OffsetDateTime,
    seq: u64,
    turn: oneshot::Sender<bool>,
}

#[derive(Default)]
struct State {
    busy: usize,
    last_turn_aged: bool,
    next_seq: u64,
    waiting: Vec<Waiter>,
}

/// The scheduler. Cheap to share behind an `Arc`.
pub struct PriorityScheduler {
    max_waits: MaxWaits,
    slots: usize,
    state: Mutex<State>,
}

/// A turn: the scheduler is held until it is dropped.
pub struct Turn<'a> {
    scheduler: &'a PriorityScheduler,
    /// True when the turn was given by aging, not by priority.
    pub aged: bool,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.scheduler.release();
    }
}

impl PriorityScheduler {
    /// A scheduler that lets `slots` batches (at least one) be worked on at once.
    pub fn new(max_waits: MaxWaits, slots: usize) -> Self {
        Self { max_waits, slots: slots.max(1), state: Mutex::default() }
    }

    /// Waits for a turn for a batch of `priority` whose oldest message was filed at `oldest`.
    pub async fn enter(&self, priority: Priority, oldest: OffsetDateTime) -> Turn<'_> {
        let rx = {
            let mut state = self.state.lock().expect("scheduler lock");
            let (tx, rx) = oneshot::channel();
            let seq = state.next_seq;
            state.next_seq += 1;
            state.waiting.push(Waiter { priority, oldest, seq, turn: tx });
            self.grant(&mut state, OffsetDateTime::now_utc());
            rx
        };
        let mut guard = Abandon { scheduler: self, rx: Some(rx) };
        let aged =
            guard.rx.as_mut().expect("receiver").await.expect("a waiter is only dropped by the scheduler with a turn");
        guard.rx = None;
        Turn { scheduler: self, aged }
    }

    fn release(&self) {
        let mut state = self.state.lock().expect("scheduler lock");
        state.busy -= 1;
        self.grant(&mut state, OffsetDateTime::now_utc());
    }

    /// Gives free slots to the next waiters, if any. P0 has one slot more than the others: it
    /// may start while every regular slot is busy, so it never waits behind lower priorities.
    fn grant(&self, state: &mut State, now: OffsetDateTime) {
        loop {
            let next = if state.busy < self.slots {
                self.pick(state, now)
            } else if state.busy == self.slots {
                Self::pick_p0(state)
            } else {
                None
            };
            let Some((index, aged)) = next else { return };
            let w = state.waiting.swap_remove(index);
            state.last_turn_aged = aged;
            // A waiter that gave up (its future was dropped) leaves the slot to the next.
            if w.turn.send(aged).is_ok() {
                state.busy += 1;
            }
        }
    }

    /// The first waiting P0 batch, for the reserved slot.
    fn pick_p0(state: &State) -> Option<(usize, bool)> {
        let first =
            state.waiting.iter().enumerate().filter(|(_, w)| w.priority == Priority::P0).min_by_key(|(_, w)| w.seq);
        first.map(|(i, _)| (i, false))
    }

    fn pick(&self, state: &State, now: OffsetDateTime) -> Option<(usize, bool)> {
        let strict =
            state.waiting.iter().enumerate().min_by_key(|(_, w)| (w.priority, w.seq)).map(|(i, w)| (i, w.priority))?;
        if !state.last_turn_aged {
            let overdue = state
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, w)| w.priority > strict.1)
                .filter_map(|(i, w)| {
                    let max = self.max_waits.of(w.priority)?;
                    let over = now - w.oldest - max;
                    over.is_positive().then_some((i, over))
                })
                .max_by_key(|(_, over)| *over);
            if let Some((i, _)) = overdue {
                return Some((i, true));
            }
        }
        Some((strict.0, false))
    }
}

/// Removes a waiter whose future is dropped before its turn; returns a turn it was given
/// meanwhile.
struct Abandon<'a> {
    scheduler: &'a PriorityScheduler,
    rx: Option<oneshot::Receiver<bool>>,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        rx.close();
        // Given a turn between the close and now: hand it on.
        if rx.try_recv().is_ok() {
            self.scheduler.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn ago(secs: i64) -> OffsetDateTime {
        OffsetDateTime::now_utc() - time::Duration::seconds(secs)
    }

    /// Queues batches behind a held turn, releases it, and returns the order they ran in.
    async fn order(
        scheduler: Arc<PriorityScheduler>,
        batches: Vec<(Priority, OffsetDateTime)>,
    ) -> Vec<(Priority, bool)> {
        let first = scheduler.enter(Priority::P0, ago(0)).await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (p, oldest) in batches {
            let (g, l) = (scheduler.clone(), log.clone());
            tasks.push(tokio::spawn(async move {
                let turn = g.enter(p, oldest).await;
                l.lock().unwrap().push((p, turn.aged));
            }));
            // Each waiter is queued (or, a P0 in the reserved slot, served) before the next is
            // spawned.
            while scheduler.state.lock().unwrap().waiting.len() + log.lock().unwrap().len() < tasks.len() {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(log).unwrap().into_inner().unwrap()
    }

    #[tokio::test]
    async fn strict_priority_when_nothing_is_overdue() {
        let scheduler = Arc::new(PriorityScheduler::new(MaxWaits::default(), 1));
        let got = order(
            scheduler,
            vec![(Priority::P3, ago(5)), (Priority::P1, ago(5)), (Priority::P0, ago(0)), (Priority::P2, ago(5))],
        )
        .await;
        let want: Vec<_> =
            [Priority::P0, Priority::P1, Priority::P2, Priority::P3].into_iter().map(|p| (p, false)).collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn an_overdue_batch_goes_next_but_not_twice_in_a_row() {
        let waits = MaxWaits { p1: Duration::from_secs(60), p2: Duration::from_secs(60), p3: Duration::from_secs(60) };
        let scheduler = Arc::new(PriorityScheduler::new(waits, 1));
        let got = order(
            scheduler,
            vec![(Priority::P3, ago(61)), (Priority::P2, ago(120)), (Priority::P0, ago(0)), (Priority::P1, ago(1))],
        )
        .await;
        // P0 takes the reserved slot at once; then P2, the most overdue (an aging turn, ahead of
        // P1); then a strict turn (P1); then P3, the only one left.
        assert_eq!(
            got,
            vec![(Priority::P0, false), (Priority::P2, true), (Priority::P1, false), (Priority::P3, false)]
        );
    }

    #[tokio::test]
    async fn a_batch_just_inside_its_max_wait_is_not_overdue() {
        let scheduler = Arc::new(PriorityScheduler::new(MaxWaits::default(), 1));
        let got = order(scheduler, vec![(Priority::P3, ago(3590)), (Priority::P0, ago(0))]).await;
        assert_eq!(got, vec![(Priority::P0, false), (Priority::P3, false)]);
    }

    #[tokio::test]
    async fn an_abandoned_waiter_does_not_keep_the_gate() {
        let scheduler = Arc::new(PriorityScheduler::new(MaxWaits::default(), 1));
        let held = scheduler.enter(Priority::P0, ago(0)).await;
        let waiting = {
            let scheduler = scheduler.clone();
            tokio::spawn(async move {
                let _turn = scheduler.enter(Priority::P3, ago(0)).await;
            })
        };
        while scheduler.state.lock().unwrap().waiting.is_empty() {
            tokio::task::yield_now().await;
        }
        waiting.abort();
        let _ = waiting.await;
        drop(held);
        let again = tokio::time::timeout(Duration::from_secs(5), scheduler.enter(Priority::P1, ago(0))).await;
        assert!(again.is_ok(), "the scheduler is free again");
    }

    #[tokio::test]
    async fn a_p0_never_waits_behind_lower_priorities_but_a_second_p0_does() {
        let scheduler = Arc::new(PriorityScheduler::new(MaxWaits::default(), 2));
        let a = scheduler.enter(Priority::P3, ago(0)).await;
        let b = scheduler.enter(Priority::P3, ago(0)).await;
        let p3 = {
            let g = scheduler.clone();
            tokio::spawn(async move { drop(g.enter(Priority::P3, ago(0)).await) })
        };
        while scheduler.state.lock().unwrap().waiting.is_empty() {
            tokio::task::yield_now().await;
        }
        let first_p0 = tokio::time::timeout(Duration::from_secs(5), scheduler.enter(Priority::P0, ago(0))).await;
        let first_p0 = first_p0.expect("a P0 starts while both regular slots are busy");
        let second = {
            let g = scheduler.clone();
            tokio::spawn(async move { drop(g.enter(Priority::P0, ago(0)).await) })
        };
        while scheduler.state.lock().unwrap().waiting.len() < 2 {
            tokio::task::yield_now().await;
        }
        drop(a);
        // The freed slot goes to the waiting P0, not to the P3 that waited longer.
        let waiting: Vec<Priority> = scheduler.state.lock().unwrap().waiting.iter().map(|w| w.priority).collect();
        assert_eq!(waiting, [Priority::P3]);
        second.await.unwrap();
        drop(first_p0);
        drop(b);
        p3.await.unwrap();
    }
}
