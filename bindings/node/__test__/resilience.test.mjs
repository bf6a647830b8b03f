// node --test: what survives the network. Servers are started here from
// target/release/netswap-server (or NETSWAP_SERVER_BIN): one is killed with SIGKILL and
// restarted under a client that must come back by itself with its watches and mirrors;
// a silent server exercises deadlines and AbortController.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { setMaxListeners } from 'node:events'
import { mkdtempSync, rmSync } from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { Client, NetswapError } from '../netswap.mjs'

const here = path.dirname(fileURLToPath(import.meta.url))
const root = path.resolve(here, '../../..')
const serverBin = process.env.NETSWAP_SERVER_BIN ?? path.join(root, 'target/release/netswap-server')

const freePort = () =>
  new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })

/** A server process with a data directory; resolves once it listens. */
function startServer(dir, port) {
  const child = spawn(serverBin, [
    '--listen', `127.0.0.1:${port}`, '--threads', '1', '--snapshot-interval', '0',
    '--orphan-grace', '60', '--data-dir', path.join(dir, 'data'), '--identity-key', path.join(dir, 'identity.key'),
  ], { stdio: ['ignore', 'pipe', 'pipe'] })
  child.log = ''
  child.stderr.on('data', (c) => { child.log += c })
  return new Promise((resolve, reject) => {
    let out = ''
    child.stdout.on('data', (chunk) => {
      out += chunk
      if (/listening on/.test(out)) resolve(child)
    })
    child.on('exit', (code) => reject(new Error(`server exited with ${code}: ${child.log}`)))
  })
}

const until = async (what, check, ms = 10000) => {
  const end = Date.now() + ms
  while (!check()) {
    if (Date.now() > end) throw new Error(`not within ${ms} ms: ${what}`)
    await new Promise((r) => setTimeout(r, 10))
  }
}

const stopped = (child) => new Promise((resolve) => child.once('exit', resolve))

test('after a SIGKILL and a restart the client comes back with its records, watch and mirror', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'netswap-node-restart-'))
  const port = await freePort()
  let server = await startServer(dir, port)
  const client = await Client.connect(`127.0.0.1:${port}`, {
    localAddress: '127.0.0.2',
    reconnect: { initialDelayMs: 50, maxDelayMs: 300 },
  })
  const states = []
  client.on('state', (s) => states.push(s.state))
  const ptr = await client.create(Buffer.from('before'), { read: true, write: true })
  const events = []
  const sub = await client.watch(ptr, (e) => events.push(e))
  const mirror = await client.mirror(ptr)
  const changes = []
  mirror.on('change', (c) => changes.push(c))

  // The record is in a snapshot; then the server dies without a word.
  server.kill('SIGUSR1')
  await until('the snapshot', () => /snapshot written/.test(server.log))
  server.kill('SIGKILL')
  await stopped(server)
  await until('reconnecting', () => states.includes('reconnecting'))
  assert.equal(client.state, 'reconnecting')

  // Meanwhile another server on the same data changes the record.
  const other = await freePort()
  const meanwhile = await startServer(dir, other)
  const writer = await Client.connect(`127.0.0.1:${other}`, { localAddress: '127.0.0.3' })
  const changedTo = await writer.replace(ptr, Buffer.from('changed meanwhile'))
  writer.close()
  meanwhile.kill('SIGTERM')
  await stopped(meanwhile)

  server = await startServer(dir, port)
  await until('connected again', () => client.state === 'connected')
  await until('the watch tells the change made while away', () =>
    events.some((e) => e.event === 'changed' && e.version === changedTo))
  await until('the mirror reloads', () => mirror.version === changedTo)
  assert.equal(mirror.data.toString(), 'changed meanwhile')
  assert.ok(changes.some((c) => c.kind === 'reloaded' && c.version === changedTo))
  assert.equal((await client.read(ptr)).toString(), 'changed meanwhile')
  assert.deepEqual(states.slice(-1), ['connected'])

  sub.unsubscribe()
  mirror.close()
  client.close()
  server.kill('SIGTERM')
  await stopped(server)
  rmSync(dir, { recursive: true, force: true })
})

/** Answers HELLO on each connection, then never answers anything. */
function silentServer() {
  return new Promise((resolve) => {
    const srv = net.createServer((sock) => {
      sock.once('data', (d) => {
        const reply = Buffer.alloc(10 + 53)
        d.copy(reply, 0, 0, 4) // the HELLO's XID
        reply[9] = 53
        reply[10] = 1 // protocol 1
        reply[16] = 0x10 // max record bytes 1 MiB
        reply[24] = 0x10 // max message bytes 1 MiB
        reply[30] = 1 // grace 1 s
        sock.write(reply)
        sock.on('data', () => {})
      })
    })
    srv.listen(0, '127.0.0.1', () => resolve({ srv, address: `127.0.0.1:${srv.address().port}` }))
  })
}

test('deadlines and AbortController end calls to a server that never answers', async () => {
  const { srv, address } = await silentServer()
  const client = await Client.connect(address, { requestTimeoutMs: 300, keepaliveMs: 0 })
  const ptr = 7n

  let started = Date.now()
  await assert.rejects(client.read(ptr), (e) => {
    assert.ok(e instanceof NetswapError)
    assert.equal(e.code, 'TIMEOUT')
    assert.match(e.message, /READ of 0000000000000007/)
    assert.match(e.message, /in flight/)
    return true
  })
  assert.ok(Date.now() - started >= 290)

  // A per-call deadline overrides the client's.
  started = Date.now()
  await assert.rejects(client.info(ptr, { timeoutMs: 50 }), (e) => e.code === 'TIMEOUT')
  assert.ok(Date.now() - started < 290, 'the shorter deadline')

  // An AbortSignal ends a call at once, with the signal's reason (as fetch does).
  const ac = new AbortController()
  const pending = client.read(ptr, { timeoutMs: 0, signal: ac.signal })
  setTimeout(() => ac.abort(), 50)
  await assert.rejects(pending, (e) => e.name === 'AbortError')
  const reason = new Error('stop now')
  const ac2 = new AbortController()
  const pending2 = client.info(ptr, { timeoutMs: 0, signal: ac2.signal })
  ac2.abort(reason)
  await assert.rejects(pending2, (e) => e === reason)
  // Already aborted: rejected at once.
  await assert.rejects(client.replace(ptr, Buffer.from('x'), { signal: AbortSignal.abort() }), (e) => e.name === 'AbortError')
  // Many aborted calls: every one ends, none hangs.
  const many = new AbortController()
  // 1,000 calls share one signal on purpose: say so, or Node warns of a listener leak.
  setMaxListeners(1000, many.signal)
  const calls = Array.from({ length: 1000 }, (_, i) => client.writeAt(ptr, BigInt(i), Buffer.from('y'), { timeoutMs: 0, signal: many.signal }))
  many.abort()
  const settled = await Promise.allSettled(calls)
  assert.ok(settled.every((r) => r.status === 'rejected' && r.reason.name === 'AbortError'))
  assert.equal(client.state, 'connected')
  client.close()
  srv.close()
})

test('a mirror stays exact under writes and iterates its changes', async () => {
  const address = process.env.NETSWAP_TEST_SERVER
  const dir = mkdtempSync(path.join(os.tmpdir(), 'netswap-node-mirror-'))
  let server
  let addr = address
  if (!addr) {
    const port = await freePort()
    server = await startServer(dir, port)
    addr = `127.0.0.1:${port}`
  }
  const writer = await Client.connect(addr, { localAddress: '127.0.0.2' })
  const reader = await Client.connect(addr, { localAddress: '127.0.0.3' })
  const ptr = await writer.create(Buffer.alloc(128), { read: true })
  const mirror = await reader.mirror(ptr)
  assert.equal(mirror.version, 1n)
  const seen = []
  const iterating = (async () => {
    for await (const c of mirror) {
      seen.push(c)
      if (c.kind === 'deleted') break
    }
  })()
  let last = 0n
  for (let i = 0; i < 100; i++) {
    last = await writer.writeAt(ptr, BigInt((i * 7) % 120), Buffer.from([i, i + 1, i + 2]))
  }
  await until('the mirror catches up', () => mirror.version === last)
  assert.ok(mirror.data.equals(await writer.read(ptr)))
  await writer.delete(ptr)
  await iterating
  assert.equal(seen.at(-1).kind, 'deleted')
  assert.ok(seen.filter((c) => c.kind === 'updated').every((c, i, a) => i === 0 || c.version > a[i - 1].version))
  writer.close()
  reader.close()
  if (server) {
    server.kill('SIGTERM')
    await stopped(server)
  }
  rmSync(dir, { recursive: true, force: true })
})
