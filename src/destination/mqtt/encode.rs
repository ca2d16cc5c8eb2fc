//! Record -> MQTT topic and payload.

use crate::destination::OutgoingRecord;

/// The topic for a record: `{functionId}` filled in, made safe for MQTT.
pub fn topic(template: &str, record: &OutgoingRecord) -> String {
    let safe: String = record
        .function_id
        .chars()
        .map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c })
        .collect();
    template.replace("{functionId}", &safe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{DestKind, DestinationType};

    #[test]
    fn function_id_is_sanitized() {
        let record = OutgoingRecord {
            id: "I".into(),
            fn_call_id: "c".into(),
            function_id: "ocid1.fn/a+b#".into(),
            destination_type: DestinationType::Success,
            kind: DestKind::Notification,
            resource_id: "t".into(),
            channel_id: None,
            body: bytes::Bytes::new(),
            attempt: 1,
            content_type: "application/json",
            cloudevent: None,
        };
        assert_eq!(
            topic("fn/{functionId}/done", &record),
            "fn/ocid1.fn_a_b_/done"
        );
        assert_eq!(topic("fixed", &record), "fixed");
    }
}
