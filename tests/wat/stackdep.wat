;; A guest whose state lives in *unexported* globals, like clang's __stack_pointer:
;; a stack that grows down from the top of memory (the stack pointer persists
;; between calls) and a bump-allocated heap. A snapshot that missed either global
;; would resume with the wrong stack or heap, and `pop`/`heap_sum` would show it.
(module
  (memory 1 16)
  (global $sp (mut i32) (i32.const 65536))
  (global $heap_top (mut i32) (i32.const 1024))
  (global $calls (mut i64) (i64.const 0))

  (func $tick (global.set $calls (i64.add (global.get $calls) (i64.const 1))))

  (func (export "push") (param $v i32) (result i32)
    (call $tick)
    (global.set $sp (i32.sub (global.get $sp) (i32.const 4)))
    (i32.store (global.get $sp) (local.get $v))
    (i32.shr_u (i32.sub (i32.const 65536) (global.get $sp)) (i32.const 2)))

  (func (export "pop") (result i32)
    (local $v i32)
    (call $tick)
    (if (i32.ge_u (global.get $sp) (i32.const 65536)) (then (return (i32.const -1))))
    (local.set $v (i32.load (global.get $sp)))
    (global.set $sp (i32.add (global.get $sp) (i32.const 4)))
    (local.get $v))

  (func (export "alloc") (param $v i32) (result i32)
    (call $tick)
    (i32.store (global.get $heap_top) (local.get $v))
    (global.set $heap_top (i32.add (global.get $heap_top) (i32.const 4)))
    (global.get $heap_top))

  (func (export "heap_sum") (result i32)
    (local $p i32) (local $sum i32)
    (local.set $p (i32.const 1024))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $p) (global.get $heap_top)))
        (local.set $sum (i32.add (local.get $sum) (i32.load (local.get $p))))
        (local.set $p (i32.add (local.get $p) (i32.const 4)))
        (br $next)))
    (local.get $sum))

  (func (export "calls") (result i64) (global.get $calls))
)
