// Env: the file system calls of the write-ahead log and the snapshots,
// behind one interface so that tests can inject faults (as LevelDB's Env
// does): writes that fail or stop short, a full disk (ENOSPC), failed
// fsyncs. Production code uses Env::Default(), plain POSIX.
//
// Every method has the contract of the POSIX call it is named after: it
// returns what the call returns and, on failure, sets errno. A test Env
// overrides the calls it fakes and forwards the rest (tests/fault_env.h).
//
// Thread safety: Default() is safe from any thread; an Env that keeps state
// must synchronize it itself.
#ifndef NEGMINE_CORE_PERSIST_ENV_H_
#define NEGMINE_CORE_PERSIST_ENV_H_

#include <fcntl.h>
#include <sys/types.h>
#include <unistd.h>

#include <cstdio>
#include <string>

namespace negmine {

class Env {
 public:
  virtual ~Env() = default;

  // The process-wide POSIX Env (never null, never deleted).
  static Env* Default() {
    static Env* const env = new Env();
    return env;
  }
  // `env`, or Default() when null.
  static Env* OrDefault(Env* env) { return env != nullptr ? env : Default(); }

  virtual int Open(const std::string& path, int flags, int mode) {
    return ::open(path.c_str(), flags, mode);
  }
  virtual ssize_t Write(int fd, const void* data, size_t n) { return ::write(fd, data, n); }
  virtual int Fdatasync(int fd) { return ::fdatasync(fd); }
  virtual int Fsync(int fd) { return ::fsync(fd); }
  virtual int Ftruncate(int fd, off_t size) { return ::ftruncate(fd, size); }
  virtual off_t Lseek(int fd, off_t offset, int whence) { return ::lseek(fd, offset, whence); }
  virtual int Close(int fd) { return ::close(fd); }
  virtual int Rename(const std::string& from, const std::string& to) {
    return ::rename(from.c_str(), to.c_str());
  }
  virtual int Unlink(const std::string& path) { return ::unlink(path.c_str()); }
};

}  // namespace negmine

#endif  // NEGMINE_CORE_PERSIST_ENV_H_
