// Starts the real negmine-server binary on a free loopback port for
// integration tests, and stops it with SIGTERM.
#ifndef NEGMINE_TESTS_SERVER_PROCESS_H_
#define NEGMINE_TESTS_SERVER_PROCESS_H_

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace negmine::testing {

class ServerProcess {
 public:
  // Starts `binary` with `extra_flags` added; waits for its port file.
  // Returns false (and says why on stderr) if it did not come up in 60 s.
  bool Start(const std::string& binary, std::vector<std::string> extra_flags = {}) {
    char tmpl[] = "/tmp/negmine-test-XXXXXX";
    dir_ = mkdtemp(tmpl);
    return Launch(binary, std::move(extra_flags));
  }

  // SIGTERM, then starts `binary` again on the same data dir.
  bool Restart(const std::string& binary, std::vector<std::string> extra_flags = {}) {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
    return Launch(binary, std::move(extra_flags));
  }

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  pid_t pid() const { return pid_; }

  // SIGTERM, then Wait().
  int Stop() {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGTERM);
    return Wait();
  }

  // Waits for the server to exit; returns its exit status (or -1).
  int Wait() {
    if (pid_ <= 0) return -1;
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

  ~ServerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

 private:
  bool Launch(const std::string& binary, std::vector<std::string> extra_flags) {
    const std::string port_file = dir_ + "/port";
    std::filesystem::remove(port_file);
    std::vector<std::string> args = {binary,
                                     "--listen=127.0.0.1:0",
                                     "--port_file=" + port_file,
                                     "--data_dir=" + dir_ + "/data",
                                     "--metrics_listen=",
                                     "--log_level=warning"};
    args.insert(args.end(), extra_flags.begin(), extra_flags.end());
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, binary.c_str(), nullptr, nullptr, argv.data(), environ) != 0) {
      pid_ = -1;
      return false;
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < deadline) {
      std::ifstream in(port_file);
      if (in >> port_) return true;
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }

  std::string dir_;
  pid_t pid_ = -1;
  int port_ = 0;
};

}  // namespace negmine::testing

#endif  // NEGMINE_TESTS_SERVER_PROCESS_H_
