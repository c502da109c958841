//! WebSocket client messages (`{"type":"subscribe",...}`): any text is
//! either a message or a ValidationError, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(ordercast::routes::ws::ClientMessage::Subscribe { filter, .. }) =
        ordercast::routes::ws::ClientMessage::parse(&text)
    {
        assert!(filter.ids.len() <= ordercast::domain::filter::MAX_IDS);
    }
});
