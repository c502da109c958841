//! REST bodies (and the Kafka events' `order` objects): NewOrder and OrderPatch.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(o) = ordercast::domain::NewOrder::parse(&value) {
            assert!(o.quantity > 0 && !o.customer_name.is_empty());
        }
        let _ = ordercast::domain::OrderPatch::parse(&value);
    }
});
