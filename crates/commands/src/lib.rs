//! The application commands: every change Trellis makes to its domain, with the events it
//! causes, between the store's queries (`trellis_store`) and the processes that make changes
//! (`trellis-api`'s routes, `trellisctl`, the dispute processor, the score orchestrator).
//!
//! A command takes the caller's transaction, makes its change with the store's queries and
//! decides what is allowed (the policy the store does not hold), and returns what it did with
//! the events it caused, as an [`Emitted`]. Nothing is in the outbox yet: [`commit`] (or
//! [`commit_with`]) writes a command's events into its transaction and commits it, and it is
//! the only code that writes `ops.outbox` rows. So an event is written exactly when its change
//! commits, and every event comes from a command. Two commands in one transaction join their
//! events ([`Emitted::absorb`]) and commit once.
//!
//! The API commits through its unit of work: `UnitOfWork::finish(tx, emitted)` calls
//! [`commit_with`] with a [`Committer`] that hands the transaction back to the layer, which
//! commits it together with the request's stored `Idempotency-Key` response.
//!
//! Which command emits which event type, and who calls it, is the catalogue in
//! `trellis_domain::events::catalogue`; this crate's tests check it against the commands.

pub mod circles;
pub mod contacts;
pub mod disputes;
pub mod identity;
mod outbox;
pub mod scores;
pub mod users;

use std::future::Future;
use std::pin::Pin;

use sqlx::{PgConnection, Postgres, Transaction};
use time::OffsetDateTime;
use trellis_domain::UserId;
use trellis_domain::events::{Event, EventPayload, EventType};

/// What a command did (`T`) and the events it caused, on their way to [`commit`].
#[must_use = "a command's events are written only by `commit`: hand this to it with the command's transaction"]
pub struct Emitted<T = ()> {
    value: T,
    parts: Vec<Part>,
}

enum Part {
    Ready(Event),
    /// Events built only as they are written (a score run's chunks of changed scores), so that
    /// a million scores never sit in memory as JSON at once.
    Deferred {
        event_type: EventType,
        events: Box<dyn Iterator<Item = Event> + Send>,
    },
}

impl Emitted<()> {
    /// Nothing done that an event describes (a write that is no domain change, such as a
    /// sign-in's token).
    pub fn none() -> Self {
        Emitted::new(())
    }

    /// Events built outside a command, to be written as they are: what tests write to stand
    /// for another producer. The processes build every event in a command (a test of this
    /// crate checks their sources).
    pub fn events(events: Vec<Event>) -> Self {
        Emitted { value: (), parts: events.into_iter().map(Part::Ready).collect() }
    }
}

impl<T> Emitted<T> {
    /// Whether committing this writes any event to the outbox.
    pub fn has_events(&self) -> bool {
        !self.parts.is_empty()
    }

    /// `value`, with no event yet.
    pub(crate) fn new(value: T) -> Self {
        Emitted { value, parts: Vec::new() }
    }

    /// Adds the event of `payload`, caused by `actor` at `at`.
    pub(crate) fn with(mut self, payload: &EventPayload, actor: Option<UserId>, at: OffsetDateTime) -> Self {
        self.parts.push(Part::Ready(Event::new(payload, actor, at)));
        self
    }

    /// Adds events of `event_type` that are built one by one as [`commit`] writes them.
    pub(crate) fn with_deferred(
        mut self,
        event_type: EventType,
        events: impl Iterator<Item = Event> + Send + 'static,
    ) -> Self {
        self.parts.push(Part::Deferred { event_type, events: Box::new(events) });
        self
    }

    /// What the command did.
    pub fn value(&self) -> &T {
        &self.value
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Emitted<U> {
        Emitted { value: f(self.value), parts: self.parts }
    }

    /// Takes `other`'s events (after this one's) and gives back its value: how the commands of
    /// one transaction gather their events for one commit.
    pub fn absorb<U>(&mut self, other: Emitted<U>) -> U {
        self.parts.extend(other.parts);
        other.value
    }

    /// The types of the events, in order (a deferred run of events counts once).
    pub fn event_types(&self) -> Vec<EventType> {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Ready(e) => EventType::parse(&e.envelope.event_type).expect("events are built from payloads"),
                Part::Deferred { event_type, .. } => *event_type,
            })
            .collect()
    }

    /// The events built so far (not the deferred ones).
    pub fn ready_events(&self) -> impl Iterator<Item = &Event> {
        self.parts.iter().filter_map(|p| match p {
            Part::Ready(e) => Some(e),
            Part::Deferred { .. } => None,
        })
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Emitted<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emitted").field("value", &self.value).field("events", &self.event_types()).finish()
    }
}

/// What a [`Committer`] does with the transaction. Boxed: an `impl Future` in a trait generic
/// over the transaction's lifetime could not be proved `Send` inside a handler's future.
pub type Committing<'c> = Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send + 'c>>;

/// Where a transaction goes once its events are written into it.
pub trait Committer<'c>: Send {
    /// Commits `tx`, or hands it to what commits it.
    fn commit(self, tx: Transaction<'c, Postgres>) -> Committing<'c>;
}

/// Commits at once.
#[derive(Debug, Clone, Copy)]
pub struct Now;

impl<'c> Committer<'c> for Now {
    fn commit(self, tx: Transaction<'c, Postgres>) -> Committing<'c> {
        Box::pin(tx.commit())
    }
}

/// Writes `emitted`'s events to the outbox in `tx` and commits it; returns what the commands
/// did. The same as [`commit_with`] and [`Now`].
pub async fn commit<T: Send>(mut tx: Transaction<'_, Postgres>, emitted: Emitted<T>) -> Result<T, sqlx::Error> {
    let value = write(&mut tx, emitted).await?;
    tx.commit().await?;
    Ok(value)
}

/// Writes `emitted`'s events to the outbox in `tx` and hands `tx` to `committer`.
pub async fn commit_with<'c, T: Send>(
    mut tx: Transaction<'c, Postgres>,
    emitted: Emitted<T>,
    committer: impl Committer<'c>,
) -> Result<T, sqlx::Error> {
    let value = write(&mut tx, emitted).await?;
    committer.commit(tx).await?;
    Ok(value)
}

/// The events into the outbox, in the transaction of their change: the one writer of outbox
/// rows, behind [`commit`] and [`commit_with`].
async fn write<T>(tx: &mut PgConnection, emitted: Emitted<T>) -> Result<T, sqlx::Error> {
    let Emitted { value, parts } = emitted;
    outbox::write(tx, parts).await?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use trellis_domain::events::EventType;

    use super::*;

    #[test]
    fn absorbed_events_follow_in_order_and_the_value_comes_back() {
        let at = OffsetDateTime::UNIX_EPOCH;
        let mut all = Emitted::none().with(&EventType::ContactRemoved.example(), None, at);
        let other = Emitted::new(7).with(&EventType::CircleMemberRemoved.example(), None, at).with_deferred(
            EventType::ScoresUpdated,
            std::iter::once(Event::new(&EventType::ScoresUpdated.example(), None, at)),
        );
        assert_eq!(all.absorb(other), 7);
        assert_eq!(
            all.event_types(),
            [EventType::ContactRemoved, EventType::CircleMemberRemoved, EventType::ScoresUpdated]
        );
        assert_eq!(all.ready_events().count(), 2);
    }
}
