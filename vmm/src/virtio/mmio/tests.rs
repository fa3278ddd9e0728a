use super::*;
use crate::virtio::ActivateError;
use std::sync::Mutex;

/// (negotiated features, queue sizes) seen at activation.
type Activation = Arc<Mutex<Option<(u64, Vec<u16>)>>>;

#[derive(Debug, Default)]
pub(crate) struct Probe {
    pub activated: Activation,
    pub resets: Arc<Mutex<u32>>,
}

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 0b101
    }
    fn config_bytes(&self) -> Vec<u8> {
        vec![1, 2, 3, 4, 5, 6]
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<ActiveQueue>,
        _interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        *self.activated.lock().unwrap() =
            Some((features, queues.iter().map(|q| q.queue.size()).collect()));
        Ok(())
    }
    fn reset(&mut self) {
        *self.resets.lock().unwrap() += 1;
    }
    fn metrics(&self) -> DeviceMetrics {
        DeviceMetrics::None
    }
}

pub(crate) fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut d = [0u8; 4];
    t.read(off, &mut d);
    u32::from_le_bytes(d)
}

pub(crate) fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Drives a transport through the Linux driver's init sequence with queues placed at
/// `base + i * 0x1000` (descriptor table, avail +0x400, used +0x800).
pub(crate) fn driver_init(t: &mut MmioTransport, features: u64, base: u64, sizes: &[u16]) {
    wr(t, 0x70, ACKNOWLEDGE);
    wr(t, 0x70, ACKNOWLEDGE | DRIVER);
    wr(t, 0x24, 0);
    wr(t, 0x20, features as u32);
    wr(t, 0x24, 1);
    wr(t, 0x20, (features >> 32) as u32);
    wr(t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(rd(t, 0x70) & FEATURES_OK, 0, "FEATURES_OK refused");
    for (i, s) in sizes.iter().enumerate() {
        let a = base + i as u64 * 0x1000;
        wr(t, 0x30, i as u32);
        wr(t, 0x38, u32::from(*s));
        wr(t, 0x80, a as u32);
        wr(t, 0x84, (a >> 32) as u32);
        wr(t, 0x90, (a + 0x400) as u32);
        wr(t, 0x94, 0);
        wr(t, 0xa0, (a + 0x800) as u32);
        wr(t, 0xa4, 0);
        wr(t, 0x44, 1);
    }
    wr(t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
}

fn transport() -> (MmioTransport, Probe) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let probe = Probe::default();
    let dev = Probe {
        activated: probe.activated.clone(),
        resets: probe.resets.clone(),
    };
    let t = MmioTransport::new(Box::new(dev), mem, EventFd::new(0).unwrap()).unwrap();
    (t, probe)
}

/// The metrics API's JSON, byte for byte as it was built with `json!` before the typed
/// structs (keys sorted, as serde_json's map without `preserve_order` sorts them).
#[test]
fn metrics_json_is_unchanged_by_the_typed_structs() {
    let (mut t, _) = transport();
    driver_init(&mut t, VIRTIO_F_VERSION_1, 0x1000, &[16, 8]);
    t.interrupt().notify_queue();
    t.interrupt().ack(crate::virtio::INT_VRING);
    t.interrupt().notify_queue();
    let m = t.metrics();
    let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let c = &t.counters;
    let old = serde_json::json!({
        "device_type": 42,
        "status": t.status(),
        "activated": true,
        "transport": {
            "reads": l(&c.reads),
            "writes": l(&c.writes),
            "refused_writes": l(&c.refused_writes),
            "bad_accesses": l(&c.bad_accesses),
            "activations": 1,
            "failed_activations": 0,
            "notifies": l(&c.notifies),
            "irq_raised": 2,
            "irq_acks": 1,
            "irq_pending": 1,
            "irq_resent": 0,
        },
        "device": serde_json::Value::Null,
    });
    assert_eq!(serde_json::to_string(&m).unwrap(), old.to_string());
    assert_eq!(serde_json::to_value(&m).unwrap(), old);
    // What tests/src/containerd.rs and the end-to-end tests read.
    let v = serde_json::to_value(&m).unwrap();
    assert_eq!(v["transport"]["irq_raised"], 2);
    assert_eq!(v["transport"]["irq_acks"], 1);
    assert_eq!(v["transport"]["irq_pending"], 1);
}

#[test]
fn device_metrics_json_is_unchanged_by_the_typed_structs() {
    use crate::virtio::{blk, fs, net, rng, vsock};
    let cases = [
        (
            DeviceMetrics::Rng(rng::RngMetrics {
                bad_requests: 1,
                bytes: 2,
                requests: 3,
            }),
            serde_json::json!({"requests": 3, "bytes": 2, "bad_requests": 1}),
        ),
        (
            DeviceMetrics::Blk(blk::BlkMetrics {
                capacity_sectors: 8,
                errors: 1,
                flushes: 2,
                read_bytes: 3,
                read_only: true,
                reads: 4,
                write_bytes: 5,
                writes: 6,
            }),
            serde_json::json!({
                "read_only": true, "capacity_sectors": 8, "reads": 4, "writes": 6,
                "flushes": 2, "read_bytes": 3, "write_bytes": 5, "errors": 1,
            }),
        ),
        (
            DeviceMetrics::Fs(fs::FsMetrics {
                backend: "/run/fs.sock".into(),
                interrupts: 7,
                tag: "shared".into(),
            }),
            serde_json::json!({"backend": "/run/fs.sock", "tag": "shared", "interrupts": 7}),
        ),
        (
            DeviceMetrics::Net(net::NetMetrics {
                backend: "vhost-net",
                features: 1 << 32,
                rx_buffers: 9,
                rx_bytes: 1,
                rx_dropped: 2,
                rx_frames: 3,
                rx_gso_frames: 10,
                rx_no_buffer: 4,
                tap: "tap0".into(),
                tap_offloads: 1,
                tx_bad: 5,
                tx_bad_hdr: 11,
                tx_bytes: 6,
                tx_csum_partial: 12,
                tx_errors: 7,
                tx_frames: 8,
                tx_gso_frames: 13,
                vhost_interrupts: 14,
            }),
            serde_json::json!({
                "backend": "vhost-net", "features": 1u64 << 32, "tap": "tap0",
                "tap_offloads": 1, "rx_frames": 3, "rx_bytes": 1, "rx_buffers": 9,
                "rx_gso_frames": 10, "rx_dropped": 2, "rx_no_buffer": 4, "tx_frames": 8,
                "tx_bytes": 6, "tx_gso_frames": 13, "tx_csum_partial": 12, "tx_bad": 5,
                "tx_bad_hdr": 11, "tx_errors": 7, "vhost_interrupts": 14,
            }),
        ),
        (
            DeviceMetrics::Vsock(vsock::VsockMetrics {
                bad_packets: 1,
                conns_opened: 2,
                conns_reset: 3,
                rx_bytes: 4,
                rx_packets: 5,
                tx_bytes: 6,
                tx_packets: 7,
            }),
            serde_json::json!({
                "tx_packets": 7, "tx_bytes": 6, "rx_packets": 5, "rx_bytes": 4,
                "bad_packets": 1, "conns_opened": 2, "conns_reset": 3,
            }),
        ),
        (DeviceMetrics::None, serde_json::Value::Null),
    ];
    for (typed, old) in cases {
        assert_eq!(serde_json::to_string(&typed).unwrap(), old.to_string());
    }
}

#[test]
fn identity_registers() {
    let (mut t, _) = transport();
    assert_eq!(rd(&mut t, 0), MAGIC);
    assert_eq!(rd(&mut t, 4), 2);
    assert_eq!(rd(&mut t, 8), 42);
    wr(&mut t, 0x14, 1);
    assert_eq!(rd(&mut t, 0x10), 1); // VERSION_1 is bit 32
    wr(&mut t, 0x14, 0);
    assert_eq!(rd(&mut t, 0x10), 0b101);
    wr(&mut t, 0x30, 1);
    assert_eq!(rd(&mut t, 0x34), 8);
    wr(&mut t, 0x30, 7);
    assert_eq!(rd(&mut t, 0x34), 0);
    wr(&mut t, 0xac, 0); // SHMSel
    assert_eq!(
        (rd(&mut t, 0xb0), rd(&mut t, 0xb4)),
        (0xffff_ffff, 0xffff_ffff)
    );
    // Misaligned / wrong size accesses read as zero.
    let mut d = [0xffu8; 2];
    t.read(0, &mut d);
    assert_eq!(d, [0, 0]);
}

#[test]
fn config_space_is_bounded() {
    let (mut t, _) = transport();
    let mut d = [0xffu8; 4];
    t.read(0x104, &mut d);
    assert_eq!(d, [5, 6, 0, 0]);
    t.read(0x200, &mut d);
    assert_eq!(d, [0; 4]);
    t.read(0xfff_ffff, &mut d);
    assert_eq!(d, [0; 4]);
    let mut big = [0xffu8; 16];
    t.read(0x100, &mut big);
    assert_eq!(big, [0; 16]);
}

#[test]
fn full_init_activates_with_queues() {
    let (mut t, probe) = transport();
    driver_init(&mut t, VIRTIO_F_VERSION_1 | 1, 0x10000, &[16, 8]);
    assert!(t.activated());
    assert_eq!(
        *probe.activated.lock().unwrap(),
        Some((VIRTIO_F_VERSION_1 | 1, vec![16, 8]))
    );
    assert_eq!(rd(&mut t, 0x70) & NEEDS_RESET, 0);
    wr(&mut t, 0x30, 0);
    assert_eq!(rd(&mut t, 0x44), 1);
}

#[test]
fn queue_changes_after_driver_ok_are_refused() {
    let (mut t, _) = transport();
    driver_init(&mut t, VIRTIO_F_VERSION_1, 0x10000, &[16, 8]);
    let refused = t.counters.refused_writes.load(Ordering::Relaxed);
    wr(&mut t, 0x30, 0);
    wr(&mut t, 0x38, 4);
    wr(&mut t, 0x80, 0xdead_0000);
    wr(&mut t, 0x44, 0);
    assert_eq!(
        t.counters.refused_writes.load(Ordering::Relaxed),
        refused + 3
    );
    assert_eq!(rd(&mut t, 0x44), 1);
    // Features cannot change either, nor can status bits be removed.
    wr(&mut t, 0x20, 0);
    wr(&mut t, 0x70, ACKNOWLEDGE);
    assert_ne!(rd(&mut t, 0x70) & DRIVER_OK, 0);
}

#[test]
fn features_ok_requires_version_1_and_offered_bits() {
    let (mut t, probe) = transport();
    wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
    wr(&mut t, 0x20, 0b10); // bit 1 not offered, no VERSION_1
    wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70) & FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK does not activate.
    wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert!(!t.activated());
    assert!(probe.activated.lock().unwrap().is_none());
}

#[test]
fn queue_outside_memory_needs_reset_not_activation() {
    let (mut t, probe) = transport();
    driver_init(&mut t, VIRTIO_F_VERSION_1, 0xff000, &[16, 8]); // 2nd queue beyond 1 MiB
    assert!(!t.activated());
    assert!(probe.activated.lock().unwrap().is_none());
    assert_ne!(rd(&mut t, 0x70) & NEEDS_RESET, 0);
    assert_ne!(rd(&mut t, 0x60) & crate::virtio::INT_CONFIG, 0);
    // Reset clears everything and allows a fresh, valid init.
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
    driver_init(&mut t, VIRTIO_F_VERSION_1, 0x10000, &[16, 8]);
    assert!(t.activated());
    wr(&mut t, 0x70, 0);
    assert_eq!(*probe.resets.lock().unwrap(), 1);
}

#[test]
fn misaligned_ring_needs_reset() {
    let (mut t, _) = transport();
    driver_init(&mut t, VIRTIO_F_VERSION_1, 0x10001, &[16, 8]); // desc table must be 16-aligned
    assert!(!t.activated());
    assert_ne!(rd(&mut t, 0x70) & NEEDS_RESET, 0);
}

#[test]
fn bad_queue_size_needs_reset() {
    let (mut t, _) = transport();
    driver_init(&mut t, VIRTIO_F_VERSION_1, 0x10000, &[16, 3]); // not a power of two
    assert!(!t.activated());
    assert_ne!(rd(&mut t, 0x70) & NEEDS_RESET, 0);
}

#[test]
fn notify_without_ioeventfd_signals_queue_event() {
    let (mut t, _) = transport();
    wr(&mut t, QUEUE_NOTIFY, 0); // before activation: refused
    assert!(t.queue_events()[0].read().is_err());
    driver_init(&mut t, VIRTIO_F_VERSION_1, 0x10000, &[16, 8]);
    wr(&mut t, QUEUE_NOTIFY, 1);
    assert_eq!(t.queue_events()[1].read().unwrap(), 1);
    wr(&mut t, QUEUE_NOTIFY, 99); // out of range: ignored
}
