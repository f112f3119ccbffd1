fn main() {
    for p in std::env::args().skip(1) {
        match evax::checkpoint::Checkpoint::load(&p) {
            Ok(c) => {
                println!("{p}: {:?} nesting={:?} extras={:?} prefix={:?} n={}", c.format, c.nesting, c.extras, c.stripped_prefix, c.tensors.len());
                for (k, v) in &c.tensors {
                    if !k.starts_with("blocks.") || k.starts_with("blocks.0.") {
                        println!("  {k} {:?} {:?}", v.dtype, v.shape);
                    }
                }
            }
            Err(e) => println!("ERR {e}"),
        }
    }
}
