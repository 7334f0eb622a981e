use std::sync::{Arc, Mutex};

use super::*;
use crate::bus::BusDevice;
use crate::legacy::serial::Serial;

/// A device whose state is one number, refused above `max`.
struct Counter {
    kind: &'static str,
    version: u32,
    value: u64,
    max: u64,
}

impl Stateful for Counter {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn state_version(&self) -> u32 {
        self.version
    }
    fn save(&self) -> Result<serde_json::Value, DeviceStateError> {
        crate::state::to_data(&self.value)
    }
    fn restore(&mut self, data: &serde_json::Value) -> Result<(), DeviceStateError> {
        let value: u64 = crate::state::from_data(data)?;
        if value > self.max {
            return Err(DeviceStateError::InterruptStatus(value as u32));
        }
        self.value = value;
        Ok(())
    }
}

fn counter(kind: &'static str, version: u32, value: u64) -> Arc<Mutex<Counter>> {
    Arc::new(Mutex::new(Counter {
        kind,
        version,
        value,
        max: 100,
    }))
}

/// Two counters registered as "a0" (kind "a") and "b0" (kind "b"), with their handles.
fn vm(
    values: (u64, u64),
    b_version: u32,
) -> (StateRegistry, Arc<Mutex<Counter>>, Arc<Mutex<Counter>>) {
    let a = counter("a", 1, values.0);
    let b = counter("b", b_version, values.1);
    let mut reg = StateRegistry::new();
    reg.add("a0", a.clone()).unwrap();
    reg.add("b0", b.clone()).unwrap();
    (reg, a, b)
}

fn value(c: &Arc<Mutex<Counter>>) -> u64 {
    c.lock().unwrap().value
}

/// What a source saved, as the destination decodes it.
fn saved_by(reg: &StateRegistry) -> DeviceStates {
    let json = serde_json::to_vec(&reg.save().unwrap()).unwrap();
    serde_json::from_slice(&json).unwrap()
}

#[test]
fn states_are_saved_under_their_ids_and_restored_through_json() {
    let (src, _, _) = vm((7, 9), 1);
    let states = saved_by(&src);
    assert_eq!(
        states.0.keys().collect::<Vec<_>>(),
        ["a0", "b0"],
        "{states:?}"
    );
    assert_eq!(states.0["b0"].kind, "b");
    assert_eq!(states.0["b0"].version, 1);

    let (dst, a, b) = vm((0, 0), 1);
    dst.restore(&states).unwrap();
    assert_eq!((value(&a), value(&b)), (7, 9));
    assert_eq!(
        dst.devices(),
        [("a0".to_string(), "a"), ("b0".to_string(), "b")]
    );
}

#[test]
fn an_unknown_device_is_refused_by_id_and_kind_and_nothing_is_restored() {
    let (src, _, _) = vm((7, 9), 1);
    let mut states = saved_by(&src);
    let mut extra = states.0["b0"].clone();
    extra.kind = "virtio-gpu".into();
    states.0.insert("virtio-gpu0".into(), extra);

    let (dst, a, b) = vm((1, 2), 1);
    let e = dst.restore(&states).unwrap_err();
    assert!(matches!(e, StatesError::UnknownDevice { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("'virtio-gpu0'") && text.contains("virtio-gpu)"),
        "{text}"
    );
    assert_eq!((value(&a), value(&b)), (1, 2));
}

#[test]
fn a_missing_device_is_refused_by_id_and_kind_and_nothing_is_restored() {
    let (src, _, _) = vm((7, 9), 1);
    let mut states = saved_by(&src);
    states.0.remove("b0");

    let (dst, a, b) = vm((1, 2), 1);
    let e = dst.restore(&states).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the state has nothing for device 'b0' (b)",
        "{e:?}"
    );
    assert_eq!((value(&a), value(&b)), (1, 2));
}

#[test]
fn a_state_of_another_kind_is_refused_naming_both() {
    let (src, _, _) = vm((7, 9), 1);
    let mut states = saved_by(&src);
    states.0.get_mut("b0").unwrap().kind = "a".into();

    let (dst, a, _) = vm((1, 2), 1);
    let e = dst.restore(&states).unwrap_err();
    assert_eq!(
        e.to_string(),
        "device 'b0' is a b here, but its state is for a a"
    );
    assert_eq!(value(&a), 1);
}

#[test]
fn a_state_of_another_version_is_refused_naming_both_versions() {
    let (src, _, _) = vm((7, 9), 1);
    let states = saved_by(&src);

    let (dst, a, b) = vm((1, 2), 2);
    let e = dst.restore(&states).unwrap_err();
    assert!(
        matches!(
            e,
            StatesError::Version {
                expected: 2,
                got: 1,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "device 'b0' (b): the state is version 1, this build reads version 2"
    );
    assert_eq!((value(&a), value(&b)), (1, 2));
}

#[test]
fn a_device_refusing_its_state_is_named_with_the_reason() {
    let (src, _, _) = vm((7, 9), 1);
    let mut states = saved_by(&src);
    states.0.get_mut("b0").unwrap().data = serde_json::json!(1000);
    let (dst, _, b) = vm((1, 2), 1);
    let e = dst.restore(&states).unwrap_err();
    assert!(
        matches!(&e, StatesError::Restore { id, kind: "b", source: DeviceStateError::InterruptStatus(1000) } if id == "b0"),
        "{e:?}"
    );
    assert_eq!(value(&b), 2);

    states.0.get_mut("b0").unwrap().data = serde_json::json!({"value": 3});
    let e = dst.restore(&states).unwrap_err();
    assert!(
        matches!(
            &e,
            StatesError::Restore {
                source: DeviceStateError::Decode(_),
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn an_id_is_registered_once() {
    let (mut reg, _, _) = vm((0, 0), 1);
    let e = reg.add("a0", counter("c", 1, 0)).unwrap_err();
    assert!(matches!(e, StatesError::DuplicateId { id } if id == "a0"));
}

/// The real UART behind the trait: its registers move, and its own checks still apply.
#[test]
fn a_uart_moves_through_the_registry_and_its_checks_still_refuse() {
    const SCR: u64 = 7;
    let uart = || {
        let irq = Arc::new(crate::interrupt::IrqLine::new(4).unwrap());
        Arc::new(Mutex::new(
            Serial::new(irq, Box::new(std::io::sink())).unwrap(),
        ))
    };
    let src = uart();
    src.lock().unwrap().write(SCR, &[0x5a]);
    let mut src_reg = StateRegistry::new();
    src_reg.add("serial0", src).unwrap();
    let mut states = saved_by(&src_reg);
    assert_eq!(states.0["serial0"].kind, "serial");

    let dst = uart();
    let mut dst_reg = StateRegistry::new();
    dst_reg.add("serial0", dst.clone()).unwrap();
    dst_reg.restore(&states).unwrap();
    let mut scratch = [0u8];
    dst.lock().unwrap().read(SCR, &mut scratch);
    assert_eq!(scratch, [0x5a]);

    states.0.get_mut("serial0").unwrap().data["in_buffer"] = serde_json::json!(vec![0u8; 65]);
    let e = dst_reg.restore(&states).unwrap_err();
    assert!(
        matches!(
            e,
            StatesError::Restore {
                source: DeviceStateError::SerialFifo { got: 65, max: 64 },
                ..
            }
        ),
        "{e:?}"
    );
}
