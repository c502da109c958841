//! Query strings of `/ws`, `/api/events` and `GET /api/orders` filters, and
//! JSON filters of subscribe messages.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(data).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let _ = ordercast::routes::StreamParams::from_query(&pairs);
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(f) = ordercast::domain::Filter::from_json(&value) {
            let _ = f.matches(1, Some("pending"), None, Some("Ada"), None);
        }
    }
});
