;; A guest that uses every kind of host state Cloudlet keeps for it: the random
;; generator, the clock and the log. After a restore it must go on exactly as the
;; original would (with a virtual clock, bit for bit).
(module
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 256) "hello\n")

  (func (export "rand") (result i32)
    (drop (call $random_get (i32.const 0) (i32.const 4)))
    (i32.load (i32.const 0)))

  (func (export "now") (param $clock i32) (result i64)
    (drop (call $clock_time_get (local.get $clock) (i64.const 1) (i32.const 8)))
    (i64.load (i32.const 8)))

  (func (export "log") (result i32)
    ;; one iovec at 16: {ptr=256, len=6}; nwritten at 24
    (i32.store (i32.const 16) (i32.const 256))
    (i32.store (i32.const 20) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))
    (i32.load (i32.const 24)))

  (func (export "exit") (param $code i32) (call $proc_exit (local.get $code)))
)
