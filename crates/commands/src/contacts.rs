//! Contacts: the directed "owner vouches for contact" edges of the trust graph.

use sqlx::PgConnection;
use time::OffsetDateTime;
use trellis_domain::UserId;
use trellis_domain::events::{CircleMember, ContactChanged, ContactRemoved, EventPayload};
use trellis_domain::identity::UserStatus;
use trellis_domain::social::ContactLabel;
use trellis_store::contacts::{ContactRow, Upsert};
use trellis_store::identity::TargetRow;

use crate::Emitted;

/// Why a contact was not added or removed.
#[derive(Debug, thiserror::Error)]
pub enum ContactError {
    #[error("one cannot be one's own contact")]
    OwnContact,
    #[error("the user is suspended")]
    Suspended,
    #[error("not a contact")]
    NotAContact,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Adds `contact` (as the statement that authenticated the owner read it) to `owner`'s
/// contacts with `label`, or changes the label: `contacts.contact_added` or
/// `contacts.contact_updated`, caused by the owner; no event when the label was already that.
/// A suspended user cannot be added.
pub async fn put(
    tx: &mut PgConnection,
    owner: UserId,
    contact: &TargetRow,
    label: &ContactLabel,
) -> Result<Emitted<(Upsert, ContactRow)>, ContactError> {
    let contact_id = UserId(contact.id);
    if contact_id == owner {
        return Err(ContactError::OwnContact);
    }
    if contact.status != UserStatus::Active {
        return Err(ContactError::Suspended);
    }
    let (outcome, row) = trellis_store::contacts::upsert(tx, owner, contact_id, label.as_str()).await?;
    let change = ContactChanged { owner_id: owner, contact_id, label: label.as_str().to_owned() };
    let payload = match outcome {
        Upsert::Created => Some(EventPayload::ContactAdded(change)),
        Upsert::Updated => Some(EventPayload::ContactUpdated(change)),
        Upsert::Unchanged => None,
    };
    let emitted = Emitted::new((outcome, row));
    Ok(match payload {
        Some(p) => emitted.with(&p, Some(owner), OffsetDateTime::now_utc()),
        None => emitted,
    })
}

/// Removes `contact` from `owner`'s contacts, and from every circle of the owner's they were
/// in: `circles.member_removed` for each circle, then `contacts.contact_removed`.
pub async fn remove(tx: &mut PgConnection, owner: UserId, contact: UserId) -> Result<Emitted, ContactError> {
    // Memberships go with the contact (a foreign key cascades); each gets its own event.
    let circles = trellis_store::circles::remove_from_all_circles(&mut *tx, owner, contact).await?;
    if !trellis_store::contacts::remove(tx, owner, contact).await? {
        return Err(ContactError::NotAContact);
    }
    let now = OffsetDateTime::now_utc();
    let mut emitted = Emitted::none();
    for circle_id in circles {
        let payload = EventPayload::CircleMemberRemoved(CircleMember {
            circle_id: circle_id.into(),
            owner_id: owner,
            user_id: contact,
        });
        emitted = emitted.with(&payload, Some(owner), now);
    }
    let removed = EventPayload::ContactRemoved(ContactRemoved { owner_id: owner, contact_id: contact });
    Ok(emitted.with(&removed, Some(owner), now))
}
