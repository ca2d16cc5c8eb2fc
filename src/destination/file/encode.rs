//! Record -> one JSON line.

use crate::destination::OutgoingRecord;

/// The record JSON followed by a newline, nothing else (SPEC section 8).
pub fn line(record: &OutgoingRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.body.len() + 1);
    out.extend_from_slice(&record.body);
    out.push(b'\n');
    out
}

/// Appends the record's line to `out` (a batch is one buffer).
pub fn push_line(out: &mut Vec<u8>, record: &OutgoingRecord) {
    out.extend_from_slice(&record.body);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{DestKind, DestinationType};

    #[test]
    fn one_line_per_record() {
        let record = OutgoingRecord {
            id: "I".into(),
            fn_call_id: "c".into(),
            function_id: "f".into(),
            destination_type: DestinationType::Success,
            kind: DestKind::Stream,
            resource_id: "s".into(),
            channel_id: None,
            body: bytes::Bytes::from_static(br#"{"id":"I"}"#),
            attempt: 1,
            content_type: "application/json",
            cloudevent: None,
        };
        assert_eq!(line(&record), b"{\"id\":\"I\"}\n");
    }
}
