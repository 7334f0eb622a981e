use super::*;

#[test]
fn labels_and_pages() {
    let c = Case {
        vcpus: 4,
        shared_pages: 1024,
    };
    assert_eq!(c.label(), "4 vCPUs + shared");
    assert_eq!(c.pages(4), 4 * 1024 + 1024);
    assert_eq!(
        Case {
            vcpus: 1,
            shared_pages: 0
        }
        .label(),
        "1 vCPU"
    );
}

#[test]
fn names_parse_back() {
    for p in [Placement::Pinned, Placement::Free] {
        assert_eq!(p.name().parse::<Placement>(), Ok(p));
    }
    for h in [Handler::InProcess, Handler::PageServer] {
        assert_eq!(h.name().parse::<Handler>(), Ok(h));
    }
    assert!("both".parse::<Placement>().is_err());
}

#[test]
fn finished_reason_prefers_the_error_line() {
    let f = Finished {
        status: None,
        stdout: String::new(),
        stderr: "vmm: restoring\nError: kvm-userfault: KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_USERFAULT: EINVAL\nbye\n".into(),
        timed_out: true,
    };
    assert_eq!(
        f.reason(),
        "Error: kvm-userfault: KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_USERFAULT: EINVAL (timed out)"
    );
}
