// node --test: the netswap addon against a real server started here
// (target/release/netswap-server, or NETSWAP_SERVER_BIN). Identities: 127.0.0.2, .3, .9.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'
import path from 'node:path'
import { Client, Pointer, ErrorCode, NetswapError } from '../netswap.mjs'

const require = createRequire(import.meta.url)

const here = path.dirname(fileURLToPath(import.meta.url))
const root = path.resolve(here, '../../..')
const serverBin = process.env.NETSWAP_SERVER_BIN ?? path.join(root, 'target/release/netswap-server')

let server
let address

before(async () => {
  server = spawn(serverBin, [
    '--listen', '127.0.0.1:0', '--threads', '1',
    '--max-record-bytes', '60000000', '--quota-records', '2000',
  ], { stdio: ['ignore', 'pipe', 'inherit'] })
  address = await new Promise((resolve, reject) => {
    let out = ''
    server.stdout.on('data', (chunk) => {
      out += chunk
      const m = /listening on (\S+)/.exec(out)
      if (m) resolve(m[1])
    })
    server.on('exit', (code) => reject(new Error(`server exited with ${code}`)))
  })
})

after(() => {
  server.kill('SIGTERM')
})

const connect = (local) => Client.connect(address, { localAddress: local })
const text = (s) => Buffer.from(s)

async function rejectsWith(promise, code) {
  await assert.rejects(promise, (err) => {
    assert.ok(err instanceof Error, 'an Error object')
    assert.equal(err.code, code, `code of: ${err.message}`)
    assert.ok(!err.message.startsWith('['), 'the code is not left in the message')
    return true
  })
}

test('every method', async () => {
  const a = await connect('127.0.0.2')
  const b = await connect('127.0.0.3')
  const hello = await a.hello()
  assert.equal(hello.protocol, 1)
  assert.equal(hello.maxRecordBytes, 60000000n)
  assert.equal(hello.identity, a.identity)
  assert.notEqual(a.identity, b.identity)

  const p = await a.create(text('hello world'), { read: true })
  assert.equal(typeof p, 'bigint')
  assert.equal((await b.read(p)).toString(), 'hello world')
  assert.equal((await a.readRange(p, 6n, 100n)).toString(), 'world')
  assert.equal(await a.writeAt(p, 11n, text('!')), 2n)
  assert.equal(await a.replace(p, new Uint8Array([118, 51])), 3n)
  assert.equal(await a.replaceIf(p, 3n, text('v4')), 4n)
  const info = await b.info(p)
  assert.deepEqual(info, { size: 2n, version: 4n, access: { read: true, write: false, takeover: false }, owned: false })

  await a.setAccess(p, { read: true, takeover: true })
  await b.takeover(p)
  assert.equal((await b.info(p)).owned, true)
  assert.equal((await b.info(p)).access.takeover, false, 'takeover clears the flag')
  await b.transfer(p, '127.0.0.2')
  assert.equal((await a.info(p)).owned, true)
  await a.transfer(p, b.identity)
  assert.equal((await b.info(p)).owned, true)
  await b.delete(p)
  await rejectsWith(b.info(p), 'ADDRESS_FAULT')

  const empty = await a.create(new Uint8Array(0))
  assert.equal((await a.read(empty)).length, 0)
  a.close()
  b.close()
})

test('errors carry a stable code and the reason', async () => {
  const a = await connect('127.0.0.2')
  const b = await connect('127.0.0.3')
  const p = await a.create(text('secret'))
  await assert.rejects(b.read(p), (e) => e.code === ErrorCode.ACCESS_VIOLATION && /READ bit/.test(e.message))
  await rejectsWith(a.readRange(p, 100n, 1n), 'ADDRESS_FAULT')
  await assert.rejects(a.replaceIf(p, 9n, text('x')), (e) => e.code === 'CONFLICT' && /version 1/.test(e.message))
  await rejectsWith(a.create(Buffer.alloc(60000001)), 'TOO_LARGE')
  await rejectsWith(a.read(0n), 'INVALID_ARGUMENT')
  await rejectsWith(a.read(-5n), 'INVALID_ARGUMENT')
  await rejectsWith(a.transfer(p, 'nobody'), 'INVALID_ARGUMENT')
  // Wrong types get the documented code and a message naming the argument, never a
  // raw napi status (BigintExpected, InvalidArg) with an empty message.
  for (const [call, words] of [
    [() => a.read(123), /read: ptr must be a bigint \(got number\)/],
    [() => a.create('str'), /create: data must be a Buffer or Uint8Array \(got string\)/],
    [() => a.create(text('x'), 'read'), /create: access must be an object/],
    [() => a.create(text('x'), { raed: true }), /unknown access flag "raed"/],
    [() => a.readRange(p, 0n, 5), /readRange: length must be a bigint \(got number\)/],
    [() => a.writeAt(p, 0, text('x')), /writeAt: offset must be a bigint/],
    [() => a.read(p, { timeoutMs: -1 }), /read: timeoutMs must be a whole number of milliseconds/],
    [() => a.read(p, { signal: 'stop' }), /read: signal must be an AbortSignal/],
    [() => a.watch(p, 'not a function'), /watch: callback must be a function/],
    [() => Client.connect(7420), /connect: address must be a string/],
  ]) {
    await assert.rejects(call(), (e) => {
      assert.ok(e instanceof NetswapError, `a NetswapError: ${e}`)
      assert.equal(e.code, 'INVALID_ARGUMENT')
      assert.match(e.message, words)
      return true
    })
  }
  await rejectsWith(Client.connect('127.0.0.1:1'), 'IO')
  await rejectsWith(Client.connect(address, { localAddress: 'not an ip' }), 'INVALID_ARGUMENT')
  // Quota: 2000 records per identity.
  const q = await connect('127.0.0.9')
  const made = await Promise.allSettled(Array.from({ length: 2001 }, () => q.create(new Uint8Array(1))))
  const refused = made.filter((r) => r.status === 'rejected')
  assert.equal(refused.length, 1)
  assert.equal(refused[0].reason.code, 'QUOTA_EXCEEDED')
  await Promise.all(made.filter((r) => r.status === 'fulfilled').map((r) => q.delete(r.value)))
  for (const c of [a, b, q]) c.close()
})

test('many concurrent promises on one client', async () => {
  const a = await connect('127.0.0.2')
  const ptrs = await Promise.all(Array.from({ length: 1000 }, (_, i) => a.create(text(`item ${i}`))))
  assert.equal(new Set(ptrs).size, 1000)
  const back = await Promise.all(ptrs.map((p) => a.read(p)))
  back.forEach((buf, i) => assert.equal(buf.toString(), `item ${i}`))
  await Promise.all(ptrs.map((p) => a.delete(p)))
  a.close()
})

test('a large buffer both ways, with the event loop responsive', async () => {
  const a = await connect('127.0.0.2')
  const big = Buffer.alloc(50_000_000)
  for (let i = 0; i < big.length; i += 4096) big[i] = i % 251
  let ticks = 0
  let last = performance.now()
  let worstGap = 0
  const timer = setInterval(() => {
    const now = performance.now()
    worstGap = Math.max(worstGap, now - last)
    last = now
    ticks++
  }, 5)
  const started = performance.now()
  const p = await a.create(big)
  const got = await a.read(p)
  const took = performance.now() - started
  clearInterval(timer)
  assert.equal(got.length, big.length)
  assert.ok(got.equals(big), 'read back equal')
  assert.ok(ticks >= 2, `timers ran during the ${took.toFixed(0)} ms transfer (${ticks} ticks)`)
  assert.ok(worstGap < Math.max(250, took / 2), `worst event-loop gap ${worstGap.toFixed(0)} ms`)
  await a.delete(p)
  a.close()
})

test('a small receive buffer still reads a large record whole; a bad one is refused', async () => {
  const a = await Client.connect(address, { localAddress: '127.0.0.2', receiveBuffer: 65536 })
  const big = Buffer.alloc(3_000_000)
  for (let i = 0; i < big.length; i++) big[i] = i % 253
  const p = await a.create(big)
  assert.ok((await a.read(p)).equals(big), 'read back equal')
  await a.delete(p)
  a.close()
  await assert.rejects(
    Client.connect(address, { receiveBuffer: -1 }),
    /connect: receiveBuffer must be a whole number of bytes/,
  )
})

test('watch callback and unsubscribe', async () => {
  const a = await connect('127.0.0.2')
  const b = await connect('127.0.0.3')
  const p = await a.create(text('v1'), { read: true })
  const events = []
  let wake
  const sub = await b.watch(p, (e) => {
    events.push(e)
    if (wake) wake()
  })
  const next = (n) => new Promise((resolve) => {
    wake = () => { if (events.length >= n) resolve() }
    wake()
  })
  assert.equal(sub.active, true)
  await a.replace(p, text('v2'))
  await next(1)
  assert.deepEqual(events[0], { event: 'changed', ptr: p, version: 2n })
  await a.setAccess(p, { read: true, write: true })
  await next(2)
  assert.equal(events[1].event, 'access-changed')
  sub.unsubscribe()
  sub.unsubscribe()
  assert.equal(sub.active, false)
  await a.replace(p, text('v3'))
  await new Promise((r) => setTimeout(r, 200))
  assert.equal(events.length, 2, 'no event after unsubscribe')
  const sub2 = await b.watch(p, (e) => { events.push(e); if (wake) wake() })
  await a.delete(p)
  await next(3)
  assert.equal(events[2].event, 'deleted')
  sub2.unsubscribe()
  await rejectsWith(b.watch(await a.create(text('private')), () => {}), 'ACCESS_VIOLATION')
  a.close()
  b.close()
})

test('close semantics', async () => {
  const a = await connect('127.0.0.2')
  assert.equal(a.closed, false)
  const p = await a.create(text('x'))
  a.close()
  a.close()
  assert.equal(a.closed, true)
  await rejectsWith(a.read(p), 'CLOSED')
  assert.throws(() => a.identity, (e) => e.code === 'CLOSED')
})

test('the package works through require() too, with the same classes', () => {
  const cjs = require('../netswap.cjs')
  assert.equal(cjs.Client, Client)
  assert.equal(cjs.ErrorCode.CONFLICT, 'CONFLICT')
  assert.equal(typeof cjs.Pointer.toHex, 'function')
})

test('watch events and error codes agree with the test vectors', () => {
  const replies = JSON.parse(readFileSync(path.join(root, 'tests/vectors/replies.json'), 'utf8')).vectors
  const names = { 1: 'changed', 2: 'deleted', 3: 'owner-changed', 4: 'access-changed', 5: 'changed' }
  let notifies = 0
  for (const v of replies.filter((r) => r.status_name === 'NOTIFY')) {
    assert.ok(v.fields.event in names, `NOTIFY event ${v.fields.event} has a name`)
    notifies++
  }
  assert.ok(notifies >= 4)
  for (const v of replies.filter((r) => !['OK', 'DATA', 'NOTIFY'].includes(r.status_name))) {
    assert.equal(ErrorCode[v.status_name], v.status_name, `${v.status_name} is an ErrorCode`)
  }
})

test('pointer helpers agree with the test vectors', () => {
  const vectors = JSON.parse(readFileSync(path.join(root, 'tests/vectors/requests.json'), 'utf8')).vectors
  const hexes = vectors.map((v) => v.fields.ptr).filter(Boolean)
  assert.ok(hexes.length >= 10)
  for (const hex of hexes) {
    const p = Pointer.fromHex(hex)
    assert.equal(typeof p, 'bigint')
    assert.equal(Pointer.toHex(p), hex)
  }
  assert.equal(Pointer.fromHex('0xFF'), 255n)
  assert.throws(() => Pointer.fromHex('0'), (e) => e.code === 'INVALID_ARGUMENT')
  assert.throws(() => Pointer.toHex(0n), (e) => e.code === 'INVALID_ARGUMENT')
})

test('an interval over the limit is MALFORMED with the reason in the test vectors', async () => {
  const malformed = JSON.parse(readFileSync(path.join(root, 'tests/vectors/malformed.json'), 'utf8')).vectors
  const vector = malformed.find((v) => v.name === 'watch-interval-over-a-minute')
  const interval = Number.parseInt(vector.payload.slice(16), 16) // after the 8-byte pointer
  assert.equal(interval, 60001)
  const a = await connect('127.0.0.2')
  const p = await a.create(text('tick'), { read: true })
  for (const attempt of [() => a.watch(p, () => {}, { minIntervalMs: interval }), () => a.mirror(p, { minIntervalMs: interval })]) {
    await assert.rejects(attempt(), (err) => {
      assert.equal(err.code, 'MALFORMED')
      assert.equal(err.message, `malformed request: ${vector.reason}`)
      return true
    })
  }
  // The limit itself is fine.
  const m = await a.mirror(p, { minIntervalMs: interval - 1 })
  assert.equal(m.data.toString(), 'tick')
  m.close()
  a.close()
})
