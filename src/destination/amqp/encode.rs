//! Record -> AMQP routing key and properties.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::destination::OutgoingRecord;

/// How a record's routing key is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    /// Always this key (`queue` on the default exchange, `routing_key`, or
    /// the resource id with `channel_id_as = "header"`).
    Fixed(String),
    /// The destination's channelId, else this (the resource id).
    ChannelElse(String),
}

impl Routing {
    /// The routing key for a record with `channel_id`.
    pub fn key<'a>(&'a self, channel_id: Option<&'a str>) -> &'a str {
        match (self, channel_id) {
            (Routing::Fixed(k), _) => k,
            (Routing::ChannelElse(_), Some(channel)) => channel,
            (Routing::ChannelElse(id), None) => id,
        }
    }

    /// Whether the channelId travels in the routing key (else in the
    /// `channel-id` header).
    pub fn channel_in_key(&self) -> bool {
        matches!(self, Routing::ChannelElse(_))
    }
}

/// Persistent JSON message, `message_id` = record id (consumers dedup on it).
pub fn properties(routing: &Routing, record: &OutgoingRecord) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("function-id"),
        AMQPValue::LongString(record.function_id.as_str().into()),
    );
    headers.insert(
        ShortString::from("destination-type"),
        AMQPValue::LongString(record.destination_type.as_str().into()),
    );
    // CloudEvents binary mode: the attributes as `cloudEvents:`
    // application properties (the AMQP binding).
    if let Some(ce) = &record.cloudevent {
        for (name, value) in ce.pairs() {
            if name != "datacontenttype" {
                headers.insert(
                    ShortString::from(format!("cloudEvents:{name}")),
                    AMQPValue::LongString(value.as_str().into()),
                );
            }
        }
    }
    if let (false, Some(channel)) = (routing.channel_in_key(), &record.channel_id) {
        headers.insert(
            ShortString::from("channel-id"),
            AMQPValue::LongString(channel.as_str().into()),
        );
    }
    BasicProperties::default()
        .with_message_id(record.id.as_str().into())
        .with_content_type(record.content_type.into())
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
            content_type: "application/json",
            cloudevent: None,
        }
    }

    #[test]
    fn routing_key_rules() {
        let by_channel = Routing::ChannelElse("failures".into());
        assert_eq!(
            by_channel.key(record(Some("ch")).channel_id.as_deref()),
            "ch"
        );
        assert_eq!(by_channel.key(None), "failures");
        let fixed = Routing::Fixed("fixed".into());
        assert_eq!(fixed.key(Some("ch")), "fixed");
    }

    #[test]
    fn properties_carry_the_id_and_persistence() {
        let p = properties(&Routing::Fixed("q".into()), &record(Some("ch")));
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "01ID");
        assert_eq!(*p.delivery_mode(), Some(2));
        let headers = p.headers().as_ref().unwrap();
        assert!(headers.inner().contains_key("channel-id"));
        let p = properties(&Routing::ChannelElse("q".into()), &record(Some("ch")));
        assert!(
            !p.headers()
                .as_ref()
                .unwrap()
                .inner()
                .contains_key("channel-id"),
            "in the routing key, not repeated in a header"
        );
    }
}
