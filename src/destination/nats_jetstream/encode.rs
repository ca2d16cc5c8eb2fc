//! Record -> JetStream publish.

use async_nats::jetstream::message::PublishMessage;

use crate::destination::OutgoingRecord;

/// Header carrying the stream key (functionId).
pub const KEY_HEADER: &str = "Fnrelay-Key";

/// `Nats-Msg-Id` = record id (server dedup), key header, JSON payload.
pub fn publish(record: &OutgoingRecord) -> PublishMessage {
    PublishMessage::build()
        .payload(record.body.clone())
        .message_id(&record.id)
        .header(KEY_HEADER, record.function_id.as_str())
        .header("Content-Type", "application/json")
}
