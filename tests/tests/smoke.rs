use weft_tests::{lab::Lab, node::LabNode, require_root};

#[test]
fn datapath_loads_in_a_lab_node() {
    require_root!();
    let lab = Lab::new().unwrap();
    let mut n1 = LabNode::open(&lab, 0, |_| {}).unwrap();
    n1.install_lab(&lab).unwrap();
}
