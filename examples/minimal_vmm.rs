fn main() {
    vm_notify::x()
}
