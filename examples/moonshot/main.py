# The quickstart: deploy a function, call it remotely, map it over a list.
from opbox import operator


@operator()
def foo(i: int = 4):
    return i * i


if __name__ == "__main__":
    foo_remote = foo.deploy()
    print(foo_remote(i=4))                  # 16, computed in a Job-Run
    print(foo_remote.map([1, 2, 3, 4, 5]))  # [1, 4, 9, 16, 25], five runs
