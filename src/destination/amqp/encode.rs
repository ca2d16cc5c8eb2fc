//! Record -> AMQP routing key and properties.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::ChannelIdAs;
use crate::destination::OutgoingRecord;

/// The routing key for a record.
pub fn routing_key(
    fixed: Option<&str>,
    channel_id_as: ChannelIdAs,
    record: &OutgoingRecord,
) -> String {
    if let Some(key) = fixed {
        return key.to_string();
    }
    match (channel_id_as, &record.channel_id) {
        (ChannelIdAs::RoutingKey, Some(channel)) => channel.clone(),
        _ => record.resource_id.clone(),
    }
}

/// Persistent JSON message, `message_id` = record id (consumers dedup on it).
pub fn properties(channel_id_as: ChannelIdAs, record: &OutgoingRecord) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("function-id"),
        AMQPValue::LongString(record.function_id.as_str().into()),
    );
    headers.insert(
        ShortString::from("destination-type"),
        AMQPValue::LongString(record.destination_type.as_str().into()),
    );
    if let (ChannelIdAs::Header, Some(channel)) = (channel_id_as, &record.channel_id) {
        headers.insert(
            ShortString::from("channel-id"),
            AMQPValue::LongString(channel.as_str().into()),
        );
    }
    BasicProperties::default()
        .with_message_id(record.id.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{DestKind, DestinationType};

    fn record(channel: Option<&str>) -> OutgoingRecord {
        OutgoingRecord {
            id: "01ID".into(),
            fn_call_id: "c".into(),
            function_id: "f".into(),
            destination_type: DestinationType::Failure,
            kind: DestKind::Queue,
            resource_id: "failures".into(),
            channel_id: channel.map(str::to_string),
            body: bytes::Bytes::from_static(b"{}"),
            attempt: 1,
        }
    }

    #[test]
    fn routing_key_rules() {
        use ChannelIdAs::*;
        assert_eq!(routing_key(None, RoutingKey, &record(Some("ch"))), "ch");
        assert_eq!(routing_key(None, RoutingKey, &record(None)), "failures");
        assert_eq!(routing_key(None, Header, &record(Some("ch"))), "failures");
        assert_eq!(
            routing_key(Some("fixed"), RoutingKey, &record(Some("ch"))),
            "fixed"
        );
    }

    #[test]
    fn properties_carry_the_id_and_persistence() {
        let p = properties(ChannelIdAs::Header, &record(Some("ch")));
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "01ID");
        assert_eq!(*p.delivery_mode(), Some(2));
        let headers = p.headers().as_ref().unwrap();
        assert!(headers.inner().contains_key("channel-id"));
    }
}
